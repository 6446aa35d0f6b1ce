//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, body and
//! error, for client generators and API fuzzers. [`ROUTES`] is the list the
//! router serves; a test checks the document and the router agree.

use axum::Json;
use serde_json::{Value, json};

/// Every route the API serves: (method, path template).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health/"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("post", "/v1/accounts"),
    ("post", "/v1/auth/challenge"),
    ("post", "/v1/auth/token"),
    ("get", "/v1/keys/{user_id}"),
    ("get", "/v1/keys/count"),
    ("put", "/v1/keys"),
    ("put", "/v1/push-token"),
    ("get", "/v1/calls/turn"),
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn json_body(schema: &str) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn signed_key() -> Value {
    json!({
        "type": "object", "additionalProperties": false, "required": ["id", "public_key", "signature"],
        "properties": {
            "id": { "type": "integer", "minimum": 0, "maximum": 4294967295u64 },
            "public_key": { "type": "string", "contentEncoding": "base64" },
            "signature": { "type": "string", "contentEncoding": "base64" }
        }
    })
}

/// The document.
pub fn document() -> Value {
    let auth_errors = |mut responses: Value| {
        responses["401"] = error_response("missing, invalid or expired token");
        responses["422"] = error_response("body is not the expected JSON");
        responses
    };
    let bearer = json!([{ "bearer": [] }]);
    json!({
        "openapi": "3.1.0",
        "info": { "title": "privcomm API", "version": env!("CARGO_PKG_VERSION"),
                  "license": { "name": "AGPL-3.0-only", "identifier": "AGPL-3.0-only" } },
        "paths": {
            "/health/": { "get": { "summary": "Database and bus checks", "responses": {
                "200": ok_json("healthy", json!({ "$ref": "#/components/schemas/Health" })),
                "503": ok_json("degraded", json!({ "$ref": "#/components/schemas/Health" })) } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": {
                "200": { "description": "text exposition format", "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": {
                "200": ok_json("OpenAPI document", json!({ "type": "object" })) } } },
            "/v1/accounts": { "post": { "summary": "Register a phone hash, or change its identity with a proof",
                "requestBody": json_body("Registration"),
                "responses": {
                    "201": ok_json("registered", json!({ "type": "object", "required": ["user_id"], "properties": { "user_id": { "type": "string", "format": "uuid" } } })),
                    "200": ok_json("identity changed", json!({ "type": "object", "properties": { "user_id": { "type": "string", "format": "uuid" }, "identity_changed": { "type": "boolean" } } })),
                    "400": error_response("a field is invalid (named in `field`)"),
                    "401": error_response("identity proof invalid"),
                    "409": error_response("phone hash already registered"),
                    "422": error_response("body is not the expected JSON"),
                    "429": error_response("rate limited") } } },
            "/v1/auth/challenge": { "post": { "summary": "A single-use nonce, valid 60 s",
                "requestBody": json_body("ChallengeRequest"),
                "responses": {
                    "200": ok_json("nonce", json!({ "type": "object", "properties": { "nonce": { "type": "string" }, "expires_in": { "type": "integer" } } })),
                    "400": error_response("user_id is not a UUID"),
                    "422": error_response("body is not the expected JSON") } } },
            "/v1/auth/token": { "post": { "summary": "A 5-minute login token for a signed nonce",
                "requestBody": json_body("TokenRequest"),
                "responses": auth_errors(json!({
                    "200": ok_json("token", json!({ "type": "object", "properties": { "token": { "type": "string" }, "token_type": { "type": "string" }, "expires_in": { "type": "integer" } } })),
                    "400": error_response("user_id is not a UUID"),
                    "429": error_response("rate limited") })) } },
            "/v1/keys/{user_id}": { "get": { "summary": "A PQXDH prekey bundle; consumes one one-time key of each kind",
                "security": bearer,
                "parameters": [{ "name": "user_id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } }],
                "responses": auth_errors(json!({
                    "200": ok_json("bundle", json!({ "$ref": "#/components/schemas/Bundle" })),
                    "400": error_response("user_id is not a UUID"),
                    "404": error_response("no such user"),
                    "429": error_response("rate limited") })) } },
            "/v1/keys/count": { "get": { "summary": "One-time keys the caller has left", "security": bearer,
                "responses": auth_errors(json!({
                    "200": ok_json("counts", json!({ "type": "object", "properties": { "one_time": { "type": "integer" }, "kyber": { "type": "integer" } } })) })) } },
            "/v1/keys": { "put": { "summary": "Upload one-time keys and/or rotate the signed and last-resort keys", "security": bearer,
                "requestBody": json_body("KeysUpdate"),
                "responses": auth_errors(json!({
                    "204": { "description": "stored" },
                    "400": error_response("a field is invalid (named in `field`)") })) } },
            "/v1/push-token": { "put": { "summary": "Register the caller's push token", "security": bearer,
                "requestBody": json_body("PushToken"),
                "responses": auth_errors(json!({
                    "204": { "description": "stored" },
                    "400": error_response("a field is invalid (named in `field`)") })) } },
            "/v1/calls/turn": { "get": { "summary": "Short-lived TURN credentials for calls (coturn REST-API scheme)", "security": bearer,
                "responses": auth_errors(json!({
                    "200": ok_json("credentials", json!({ "type": "object", "required": ["urls", "username", "credential", "ttl"], "properties": {
                        "urls": { "type": "array", "items": { "type": "string" }, "description": "turn:, turns: and stun: URLs" },
                        "username": { "type": "string", "description": "<expiry, Unix seconds>:<user id>" },
                        "credential": { "type": "string", "description": "Base64(HMAC-SHA1(TURN secret, username))" },
                        "ttl": { "type": "integer", "description": "seconds the credential is valid" } } })),
                    "429": error_response("over the TURN-credential limit; see Retry-After"),
                    "503": error_response("calls are not configured (TURN_URLS is empty)") })) } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": {
                    "error": { "type": "string", "enum": ["invalid_field", "unprocessable_body", "unauthorized", "not_found", "conflict", "rate_limited", "not_configured", "internal"] },
                    "message": { "type": "string" }, "field": { "type": ["string", "null"] }, "retry_after": { "type": "integer" } } },
                "Health": { "type": "object", "properties": { "status": { "type": "string", "enum": ["ok", "degraded"] },
                    "checks": { "type": "object", "properties": { "database": { "type": "string" }, "bus": { "type": "string" } } },
                    "version": { "type": "string" } } },
                "SignedKey": signed_key(),
                "OneTimeKey": { "type": "object", "additionalProperties": false, "required": ["id", "public_key"], "properties": {
                    "id": { "type": "integer", "minimum": 0, "maximum": 4294967295u64 }, "public_key": { "type": "string", "contentEncoding": "base64" } } },
                "Registration": { "type": "object", "additionalProperties": false,
                    "required": ["phone_hash", "registration_id", "identity_key", "signed_prekey", "kyber_last_resort"],
                    "properties": {
                        "phone_hash": { "type": "string", "pattern": "^[0-9a-f]{64}$" },
                        "registration_id": { "type": "integer", "minimum": 1, "maximum": 16380 },
                        "identity_key": { "type": "string", "contentEncoding": "base64" },
                        "signed_prekey": { "$ref": "#/components/schemas/SignedKey" },
                        "kyber_last_resort": { "$ref": "#/components/schemas/SignedKey" },
                        "one_time_prekeys": { "type": "array", "maxItems": 100, "items": { "$ref": "#/components/schemas/OneTimeKey" } },
                        "kyber_prekeys": { "type": "array", "maxItems": 100, "items": { "$ref": "#/components/schemas/SignedKey" } },
                        "identity_proof": { "type": ["object", "null"], "additionalProperties": false, "required": ["nonce", "signature"],
                            "properties": { "nonce": { "type": "string" }, "signature": { "type": "string", "contentEncoding": "base64" } } } } },
                "KeysUpdate": { "type": "object", "additionalProperties": false, "properties": {
                    "one_time_prekeys": { "type": "array", "maxItems": 100, "items": { "$ref": "#/components/schemas/OneTimeKey" } },
                    "kyber_prekeys": { "type": "array", "maxItems": 100, "items": { "$ref": "#/components/schemas/SignedKey" } },
                    "signed_prekey": { "$ref": "#/components/schemas/SignedKey" },
                    "kyber_last_resort": { "$ref": "#/components/schemas/SignedKey" } } },
                "ChallengeRequest": { "type": "object", "additionalProperties": false, "required": ["user_id"],
                    "properties": { "user_id": { "type": "string", "format": "uuid" } } },
                "TokenRequest": { "type": "object", "additionalProperties": false, "required": ["user_id", "nonce", "signature"],
                    "properties": { "user_id": { "type": "string", "format": "uuid" }, "nonce": { "type": "string" }, "signature": { "type": "string", "contentEncoding": "base64" } } },
                "PushToken": { "type": "object", "additionalProperties": false, "required": ["platform", "token"],
                    "properties": { "platform": { "type": "string", "enum": ["fcm", "apns"] }, "token": { "type": "string", "minLength": 1, "maxLength": 4096 } } },
                "Bundle": { "type": "object", "properties": {
                    "user_id": { "type": "string", "format": "uuid" }, "registration_id": { "type": "integer" },
                    "identity_key": { "type": "string", "contentEncoding": "base64" },
                    "signed_prekey": { "$ref": "#/components/schemas/SignedKey" },
                    "one_time_prekey": { "oneOf": [{ "$ref": "#/components/schemas/OneTimeKey" }, { "type": "null" }] },
                    "kyber_prekey": { "allOf": [{ "$ref": "#/components/schemas/SignedKey" }],
                        "properties": { "last_resort": { "type": "boolean" } } } } }
            }
        }
    })
}

/// `GET /openapi.json`.
pub async fn serve() -> Json<Value> {
    Json(document())
}
