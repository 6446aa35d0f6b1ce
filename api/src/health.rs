//! `GET /health/`: is this node able to serve? Checks the database and the bus.

use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::time::Duration;

/// A dependency that does not answer within this time counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The health routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/health/", get(health)).route("/health", get(health))
}

/// Which process answers: `NODE_ID` and `ROLES`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeIdentity {
    /// The process's name.
    pub node: String,
    /// What it runs (`api`, `relay`, `projector`).
    pub roles: Vec<String>,
}

/// The `/health/` body.
#[derive(Serialize)]
pub struct HealthReport {
    /// `ok` or `degraded`.
    pub status: &'static str,
    /// `ok` or `unavailable` per dependency.
    pub checks: Checks,
    /// This build's version.
    pub version: &'static str,
    /// This process's name.
    pub node: String,
    /// Its roles.
    pub roles: Vec<String>,
}

/// Per-dependency verdicts.
#[derive(Serialize)]
pub struct Checks {
    /// The event store.
    pub database: &'static str,
    /// The event bus.
    pub bus: &'static str,
}

async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let database = verdict("database", tokio::time::timeout(CHECK_TIMEOUT, state.store.check_health()).await);
    let bus = verdict("bus", tokio::time::timeout(CHECK_TIMEOUT, state.bus.last_published()).await);
    let healthy = database == "ok" && bus == "ok";
    let report = HealthReport {
        status: if healthy { "ok" } else { "degraded" },
        checks: Checks { database, bus },
        version: env!("CARGO_PKG_VERSION"),
        node: state.node.node.clone(),
        roles: state.node.roles.clone(),
    };
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(report))
}

/// Logs the cause (the client only learns `unavailable`).
fn verdict<T, E: std::fmt::Display>(
    what: &str,
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> &'static str {
    match result {
        Ok(Ok(_)) => "ok",
        Ok(Err(error)) => {
            tracing::warn!(check = what, %error, "health check failed");
            "unavailable"
        }
        Err(_) => {
            tracing::warn!(check = what, timeout_s = CHECK_TIMEOUT.as_secs(), "health check timed out");
            "unavailable"
        }
    }
}
