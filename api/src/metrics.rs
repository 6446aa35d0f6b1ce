//! `GET /metrics` in the Prometheus text format: requests and latencies by
//! route and status, events appended, rate-limit rejections.

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Default)]
struct RouteStats {
    count: u64,
    sum_seconds: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Another part of the process that has figures for `/metrics` (the
/// projection workers' lag, for one).
pub trait MetricsSource: Send + Sync + 'static {
    /// Appends its exposition text.
    fn render(&self, out: &mut String);
}

/// Counters shared by the whole API.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), RouteStats>>,
    events_appended: AtomicU64,
    rate_limited: Mutex<BTreeMap<&'static str, u64>>,
    sources: Mutex<Vec<Arc<dyn MetricsSource>>>,
}

impl Metrics {
    /// Adds figures from elsewhere in the process to `/metrics`.
    pub fn add_source(&self, source: Arc<dyn MetricsSource>) {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).push(source);
    }

    /// Counts appended events.
    pub fn events_appended(&self, n: usize) {
        self.events_appended.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a rate-limit rejection.
    pub fn rate_limited(&self, limit: &'static str) {
        *self.rate_limited.lock().unwrap_or_else(|p| p.into_inner()).entry(limit).or_default() += 1;
    }

    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let stats = requests.entry((method.to_owned(), route.to_owned(), status)).or_default();
        stats.count += 1;
        stats.sum_seconds += seconds;
        for (bucket, bound) in stats.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP privcomm_http_requests_total HTTP requests by method, route and status.");
        let _ = writeln!(out, "# TYPE privcomm_http_requests_total counter");
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for ((method, route, status), stats) in requests.iter() {
            let _ = writeln!(
                out,
                "privcomm_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                stats.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP privcomm_http_request_duration_seconds HTTP request latency by method, route and status."
        );
        let _ = writeln!(out, "# TYPE privcomm_http_request_duration_seconds histogram");
        for ((method, route, status), stats) in requests.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            for (count, bound) in stats.buckets.iter().zip(BUCKETS) {
                let _ =
                    writeln!(out, "privcomm_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}");
            }
            let _ =
                writeln!(out, "privcomm_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", stats.count);
            let _ = writeln!(out, "privcomm_http_request_duration_seconds_sum{{{labels}}} {}", stats.sum_seconds);
            let _ = writeln!(out, "privcomm_http_request_duration_seconds_count{{{labels}}} {}", stats.count);
        }
        drop(requests);
        let _ = writeln!(out, "# HELP privcomm_events_appended_total Events appended by this node's API.");
        let _ = writeln!(out, "# TYPE privcomm_events_appended_total counter");
        let _ = writeln!(out, "privcomm_events_appended_total {}", self.events_appended.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP privcomm_rate_limited_total Requests refused with 429, by limit.");
        let _ = writeln!(out, "# TYPE privcomm_rate_limited_total counter");
        for limit in ["registration", "key_bundle", "token_issue", "turn"] {
            let count = self.rate_limited.lock().unwrap_or_else(|p| p.into_inner()).get(limit).copied().unwrap_or(0);
            let _ = writeln!(out, "privcomm_rate_limited_total{{limit=\"{limit}\"}} {count}");
        }
        for source in self.sources.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            source.render(&mut out);
        }
        out
    }
}

/// Middleware recording every request.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    // The route template, never the raw path: user ids must not become labels.
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let response = next.run(request).await;
    metrics.observe(&method, &route, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`.
pub async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render())
}
