//! privcomm's HTTP API (axum).
//!
//! One [`AppState`] is shared by every route; each resource is a module with
//! a `router()`; [`router`] composes them. This crate knows the event store
//! and bus only through the `privcomm_domain` traits — the `privcomm` binary
//! chooses the implementations.
//!
//! Routes so far: `GET /health/` ([`health`]). Registration, keys, login
//! tokens and TURN credentials follow.

pub mod health;

use axum::Router;
use privcomm_domain::{EventBus, EventStore};
use std::sync::Arc;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// The fan-out bus.
    pub bus: Arc<dyn EventBus>,
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    Router::new().merge(health::router()).with_state(state)
}
