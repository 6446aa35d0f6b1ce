//! Rate limits. Over a limit the answer is 429 with `Retry-After` and
//! `{"error":"rate_limited","retry_after":<seconds>}`.
//!
//! | limit | key | default |
//! |---|---|---|
//! | registration (`POST /v1/accounts`) | client IP (the TCP peer) | 10 per hour |
//! | key-bundle fetch (`GET /v1/keys/{id}`) | requesting user (token `sub`; IP if no valid token) | 5 per minute |
//! | token issue (`POST /v1/auth/token`) | user in the body | 10 per minute |
//! | TURN credentials (`GET /v1/calls/turn`) | requesting user (as key bundles) | 10 per minute |
//!
//! The registration, key-bundle and TURN limits are tower_governor layers on their routes. The token limit
//! is keyed by a field of the JSON body, which a tower layer cannot see, so
//! the handler asks the same GCRA limiter (governor, tower_governor's engine).

use crate::error::ApiError;
use crate::tokens::Tokens;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use privcomm_domain::{Timestamp, UserId};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tower_governor::GovernorError;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::{KeyExtractor, PeerIpKeyExtractor};

/// `requests` per `per`, as a burst that refills evenly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed in a window.
    pub requests: u32,
    /// The window.
    pub per: Duration,
}

impl RateLimit {
    fn period(self) -> Duration {
        (self.per / self.requests.max(1)).max(Duration::from_nanos(1))
    }

    fn quota(self) -> Quota {
        let burst = NonZeroU32::new(self.requests.max(1)).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(self.period()).unwrap_or_else(|| Quota::per_second(burst)).allow_burst(burst)
    }
}

/// The limits.
#[derive(Clone, Copy, Debug)]
pub struct RateLimits {
    /// Registrations per client IP.
    pub registration: RateLimit,
    /// Key-bundle fetches per requesting user.
    pub key_bundle: RateLimit,
    /// Token issues per user.
    pub token_issue: RateLimit,
    /// TURN credentials per requesting user.
    pub turn: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            registration: RateLimit { requests: 10, per: Duration::from_secs(3600) },
            key_bundle: RateLimit { requests: 5, per: Duration::from_secs(60) },
            token_issue: RateLimit { requests: 10, per: Duration::from_secs(60) },
            turn: RateLimit { requests: 10, per: Duration::from_secs(60) },
        }
    }
}

/// The limiter the token handler asks.
pub struct HandlerLimits {
    token_issue: DefaultKeyedRateLimiter<UserId>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl HandlerLimits {
    /// Limiters for `limits`.
    pub fn new(limits: &RateLimits, metrics: Arc<crate::metrics::Metrics>) -> HandlerLimits {
        HandlerLimits { token_issue: DefaultKeyedRateLimiter::keyed(limits.token_issue.quota()), metrics }
    }

    /// Counts a token issue for `user`.
    pub fn check_token_issue(&self, user: UserId) -> Result<(), ApiError> {
        self.token_issue.check_key(&user).map_err(|not_until| {
            self.metrics.rate_limited("token_issue");
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited { retry_after: wait.as_secs_f64().ceil().max(1.0) as u64 }
        })?;
        // Forget idle keys now and then so the map cannot grow without bound.
        if self.token_issue.len() > 100_000 {
            self.token_issue.retain_recent();
        }
        Ok(())
    }
}

/// Keys the bundle limit by the requesting user.
#[derive(Clone)]
pub struct RequesterKeyExtractor {
    tokens: Arc<Tokens>,
    clock: Arc<dyn privcomm_domain::Clock>,
}

impl KeyExtractor for RequesterKeyExtractor {
    type Key = String;

    fn extract<T>(&self, request: &Request<T>) -> Result<Self::Key, GovernorError> {
        let token = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let now: Timestamp = self.clock.now();
        if let Some(user) = token.and_then(|t| self.tokens.verify(t, now).ok()) {
            return Ok(format!("user:{}", user.0));
        }
        // No valid token: the handler will answer 401; limit such requests by IP.
        let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        peer.map(|ip| format!("ip:{ip}")).ok_or(GovernorError::UnableToExtractKey)
    }
}

fn rejection(metrics: &Arc<crate::metrics::Metrics>, limit: &'static str, error: GovernorError) -> Response<Body> {
    match error {
        GovernorError::TooManyRequests { wait_time, .. } => {
            metrics.rate_limited(limit);
            ApiError::RateLimited { retry_after: wait_time.max(1) }.into_response()
        }
        other => ApiError::internal(std::io::Error::other(other.to_string())).into_response(),
    }
}

/// Puts `limit`, keyed by `extractor`, in front of every route of `router`.
fn limited<S, K>(
    router: axum::Router<S>,
    limit: RateLimit,
    extractor: K,
    name: &'static str,
    metrics: Arc<crate::metrics::Metrics>,
) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
    K: KeyExtractor + Send + Sync + 'static,
    K::Key: Send + Sync,
{
    let config = GovernorConfigBuilder::default()
        .period(limit.period())
        .burst_size(limit.requests.max(1))
        .key_extractor(extractor)
        .finish();
    match config {
        Some(config) => router.layer(
            tower_governor::GovernorLayer::new(config).error_handler(move |error| rejection(&metrics, name, error)),
        ),
        // Only a zero period or burst is refused, and RateLimit keeps both positive.
        None => router,
    }
}

/// Applies the registration limit (per client IP) to `router`.
pub fn limit_registration<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    limit: RateLimit,
    metrics: Arc<crate::metrics::Metrics>,
) -> axum::Router<S> {
    limited(router, limit, PeerIpKeyExtractor, "registration", metrics)
}

/// Applies a limit per requesting user (the key-bundle and TURN limits),
/// counted in `/metrics` as `name`, to `router`.
pub fn limit_per_requester<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    name: &'static str,
    limit: RateLimit,
    tokens: Arc<Tokens>,
    clock: Arc<dyn privcomm_domain::Clock>,
    metrics: Arc<crate::metrics::Metrics>,
) -> axum::Router<S> {
    limited(router, limit, RequesterKeyExtractor { tokens, clock }, name, metrics)
}
