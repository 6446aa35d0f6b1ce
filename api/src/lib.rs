//! privcomm's HTTP API (axum).
//!
//! One [`AppState`] is shared by every handler; each resource is a module
//! with a `router()` ([`accounts`], [`auth`], [`keys`], [`push`], [`calls`],
//! [`health`]);
//! [`router`] composes them with the cross-cutting layers: request ids,
//! JSON request logs, CORS, rate limits ([`limits`]), metrics ([`metrics`]),
//! and the OpenAPI document ([`openapi`]). Every state change is a command on
//! a user aggregate ([`users`]), appended as events; errors are one type,
//! [`error::ApiError`]. Keys are checked with libsignal ([`validate`]);
//! login challenges and tokens live in [`tokens`].
//!
//! This crate knows the event store, bus and nonce ledger only through the
//! `privcomm_domain` traits — the `privcomm` binary chooses implementations.

pub mod accounts;
pub mod auth;
pub mod calls;
pub mod error;
pub mod health;
pub mod json;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod push;
pub mod tokens;
pub mod users;
pub mod validate;
pub mod wire;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use axum::routing::get;
use privcomm_domain::nonces::NonceLedger;
use privcomm_domain::{Clock, EventBus, EventStore};
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// The request-id header, taken from the client or generated.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Settings of the API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// `SECRET_KEY`: signs login tokens and challenges.
    pub secret_key: Vec<u8>,
    /// `SECRET_KEY_PREVIOUS`: the secret before a rotation, still accepted
    /// for one token lifetime from the start (see [`tokens`]).
    pub previous_secret_key: Option<Vec<u8>>,
    /// Token and challenge lifetimes.
    pub tokens: tokens::TokenSettings,
    /// Rate limits.
    pub rate_limits: limits::RateLimits,
    /// `CORS_ORIGINS`.
    pub cors_origins: Vec<String>,
    /// How many user aggregates to keep folded in memory.
    pub user_cache_capacity: usize,
    /// This process's name and roles, reported by `/health/`.
    pub node: health::NodeIdentity,
    /// TURN servers and credentials for calls.
    pub turn: calls::TurnConfig,
}

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// The fan-out bus.
    pub bus: Arc<dyn EventBus>,
    /// Single use of login challenges.
    pub nonces: Arc<dyn NonceLedger>,
    /// Now.
    pub clock: Arc<dyn Clock>,
    /// User aggregates: decide and append.
    pub users: Arc<users::UserDirectory>,
    /// Challenges and tokens.
    pub tokens: Arc<tokens::Tokens>,
    /// Limits checked inside handlers.
    pub limits: Arc<limits::HandlerLimits>,
    /// Counters for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Who answers `/health/`.
    pub node: Arc<health::NodeIdentity>,
    /// TURN servers and credentials for calls.
    pub turn: Arc<calls::TurnConfig>,
}

impl AppState {
    /// Builds the state from its dependencies.
    pub fn new(
        store: Arc<dyn EventStore>,
        bus: Arc<dyn EventBus>,
        nonces: Arc<dyn NonceLedger>,
        clock: Arc<dyn Clock>,
        config: &ApiConfig,
    ) -> AppState {
        let metrics = Arc::new(metrics::Metrics::default());
        let mut tokens = tokens::Tokens::new(&config.secret_key, config.tokens.clone());
        if let Some(previous) = &config.previous_secret_key {
            tokens = tokens.accepting_previous(previous, clock.now());
        }
        AppState {
            users: Arc::new(users::UserDirectory::new(store.clone(), config.user_cache_capacity, metrics.clone())),
            tokens: Arc::new(tokens),
            limits: Arc::new(limits::HandlerLimits::new(&config.rate_limits, metrics.clone())),
            store,
            bus,
            nonces,
            clock,
            metrics,
            node: Arc::new(config.node.clone()),
            turn: Arc::new(config.turn.clone()),
        }
    }
}

async fn metrics_text(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    metrics::render(State(state.metrics)).await
}

fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, REQUEST_ID])
        .expose_headers([REQUEST_ID])
        .max_age(Duration::from_secs(600))
}

/// The whole HTTP API, with `/health/` and `/metrics`. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`: the registration
/// limit is keyed by the client's address.
pub fn router(state: AppState, config: &ApiConfig) -> Router {
    let limits = config.rate_limits;
    let accounts = limits::limit_registration(accounts::router(), limits.registration, state.metrics.clone());
    let per_requester = |router, name, limit| {
        limits::limit_per_requester(
            router,
            name,
            limit,
            state.tokens.clone(),
            state.clock.clone(),
            state.metrics.clone(),
        )
    };
    let bundles = per_requester(keys::bundle_router(), "key_bundle", limits.key_bundle);
    let calls = per_requester(calls::router(), "turn", limits.turn);
    let api = Router::new()
        .merge(accounts)
        .merge(auth::router())
        .merge(bundles)
        .merge(calls)
        .merge(keys::router())
        .merge(push::router())
        .route("/openapi.json", get(openapi::serve));
    with_layers(operations_routes().merge(api), state, config)
}

/// Only `/health/` and `/metrics`: a process that runs no API role.
pub fn operations_router(state: AppState, config: &ApiConfig) -> Router {
    with_layers(operations_routes(), state, config)
}

fn operations_routes() -> Router<AppState> {
    Router::new().merge(health::router()).route("/metrics", get(metrics_text))
}

/// The cross-cutting layers every route gets.
fn with_layers(routes: Router<AppState>, state: AppState, config: &ApiConfig) -> Router {
    routes
        .route_layer(axum::middleware::from_fn_with_state(state.metrics.clone(), metrics::track))
        .with_state(state)
        .layer(DefaultBodyLimit::max(json::MAX_BODY_BYTES))
        .layer(cors(&config.cors_origins))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let request_id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %request_id,
                        user_id = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(|response: &axum::response::Response, latency: Duration, _span: &tracing::Span| {
                    tracing::info!(
                        status = response.status().as_u16(),
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        "request completed"
                    );
                }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}
