//! `privcomm bench-api`: key-bundle fetches and registrations per second
//! against PostgreSQL, through the real HTTP API. See docs/BENCHMARKS.md.
//!
//! The API runs in this process on 127.0.0.1:0 over a fresh database; the
//! load comes from the same process (closed loop, a fixed number of
//! requesters), so server and load generator share the machine's cores.

use crate::clock::SystemClock;
use crate::eventstore::LogStore;
use crate::eventstore::postgres::{PoolSize, PostgresEventStore};
use crate::keygen::KeyedUser;
use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use privcomm_api::limits::{RateLimit, RateLimits};
use rand::Rng as _;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Benchmark settings.
#[derive(Args, Debug, Clone)]
pub struct BenchApiArgs {
    #[command(flatten)]
    pub server: crate::bench::BenchPostgres,
    /// Registered users.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// One-time EC and Kyber prekeys per user.
    #[arg(long, default_value_t = 20)]
    pub prekeys: u32,
    /// Concurrent requesters.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Bundle fetches in the closed-loop phase (as fast as the requesters can go).
    #[arg(long, default_value_t = 20_000)]
    pub fetches: usize,
    /// Arrival rate (fetches per second) of the open-loop phase.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Seconds of the open-loop phase.
    #[arg(long, default_value_t = 10)]
    pub rate_seconds: u32,
}

struct Phase {
    histogram: Histogram<u64>,
    elapsed: Duration,
    count: usize,
}

impl Phase {
    fn print(&self, name: &str) {
        println!(
            "  {name:<28} {:>8.0} /s   p50 {:>6.1} ms   p99 {:>6.1} ms   ({} requests, {:.1} s)",
            self.count as f64 / self.elapsed.as_secs_f64(),
            self.histogram.value_at_quantile(0.5) as f64 / 1000.0,
            self.histogram.value_at_quantile(0.99) as f64 / 1000.0,
            self.count,
            self.elapsed.as_secs_f64()
        );
    }
}

/// Runs `requests` jobs with `concurrency` workers; each job returns the HTTP status.
async fn run_phase<F, Fut>(requests: usize, concurrency: usize, expect: u16, job: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u16>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (job, next) = (job.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return anyhow::Ok(histogram);
                }
                let t = Instant::now();
                let status = job(n).await?;
                anyhow::ensure!(status == expect, "request {n} answered {status}, expected {expect}");
                histogram.record(t.elapsed().as_micros() as u64)?;
            }
        }));
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    for worker in workers {
        histogram.add(worker.await??)?;
    }
    Ok(Phase { histogram, elapsed: started.elapsed(), count: requests })
}

/// `requesters` clients together send `rate` requests per second for
/// `seconds`: each client sends at its own fixed schedule (staggered), and
/// every request leaves at its scheduled time whatever happened to earlier
/// ones. Latency counts from the scheduled time, so a slow server cannot hide
/// its queue (no coordinated omission).
async fn open_loop<F, Fut>(rate: u32, seconds: u32, requesters: usize, job: F) -> anyhow::Result<Phase>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u16>> + Send + 'static,
{
    let requesters = requesters.max(1);
    let total = (rate as usize) * (seconds as usize);
    let spacing = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let started = tokio::time::Instant::now();
    let mut clients = Vec::with_capacity(requesters);
    for client in 0..requesters {
        let job = job.clone();
        clients.push(tokio::spawn(async move {
            let mut in_flight = Vec::new();
            // Request n of the whole run belongs to client n % requesters.
            for n in (client..total).step_by(requesters) {
                let scheduled = started + spacing * n as u32;
                tokio::time::sleep_until(scheduled).await;
                let request = job();
                in_flight.push(tokio::spawn(async move {
                    let status = request.await?;
                    anyhow::ensure!(status == 200, "open-loop request answered {status}");
                    anyhow::Ok(scheduled.elapsed())
                }));
            }
            let mut histogram = Histogram::<u64>::new(3)?;
            for request in in_flight {
                histogram.record(request.await??.as_micros() as u64)?;
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    for client in clients {
        histogram.add(client.await??)?;
    }
    Ok(Phase { histogram, elapsed: started.elapsed(), count: total })
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchApiArgs) -> anyhow::Result<()> {
    println!(
        "privcomm bench-api — {} cores; {} users with {} + {} one-time prekeys; {} concurrent requesters",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.users,
        args.prekeys,
        args.prekeys,
        args.concurrency
    );
    let admin = sqlx::PgPool::connect(&args.server.postgres_url)
        .await
        .with_context(|| format!("connecting to {}", args.server.postgres_url))?;
    let name = format!("privcomm_bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
    let url = format!(
        "{}/{name}",
        args.server.postgres_url.rsplit_once('/').map_or(args.server.postgres_url.as_str(), |(base, _)| base)
    );
    let outcome = measure(&args, &url).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&admin).await?;
    outcome
}

async fn measure(args: &BenchApiArgs, url: &str) -> anyhow::Result<()> {
    crate::migrate::migrate_up(url).await?;
    let pool = crate::eventstore::postgres::connect_pool(url, PoolSize::default()).await?;
    let store: Arc<dyn LogStore> = Arc::new(PostgresEventStore::open(pool, Arc::new(SystemClock)).await?);
    let unlimited = RateLimit { requests: 1_000_000, per: Duration::from_secs(1) };
    let config = privcomm_api::ApiConfig {
        secret_key: b"bench-secret-key-bench-secret-key-0123".to_vec(),
        previous_secret_key: None,
        tokens: Default::default(),
        rate_limits: RateLimits {
            registration: unlimited,
            key_bundle: unlimited,
            token_issue: unlimited,
            turn: unlimited,
        },
        cors_origins: vec![],
        user_cache_capacity: args.users + 100,
        node: Default::default(),
        turn: Default::default(),
    };
    let links = crate::serve::Links::embedded(store.clone(), Default::default()).await?;
    let (_keep_connections_open, connections_stop) = tokio::sync::watch::channel(false);
    let app = crate::serve::build_app(
        store.clone(),
        links,
        Arc::new(SystemClock),
        &config,
        privcomm_relay::RelaySettings::default(),
        connections_stop,
        &[],
        &crate::config::Role::ALL,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;

    print!("  generating keys for {} users (not timed)… ", args.users);
    let prekeys = args.prekeys;
    let users = args.users;
    let generated = tokio::task::spawn_blocking(move || {
        (0..users)
            .map(|i| {
                let user = KeyedUser::new(&format!("+1999{i:08}"));
                let body = user.registration(1 + (i as u32 % 16_000), prekeys, prekeys);
                (user, body)
            })
            .collect::<Vec<_>>()
    })
    .await?;
    println!("done");
    let (keyed, bodies): (Vec<KeyedUser>, Vec<Value>) = generated.into_iter().unzip();
    let bodies = Arc::new(bodies);

    let (client, base_url, register_bodies) = (http.clone(), base.clone(), bodies.clone());
    let registration = run_phase(args.users, args.concurrency, 201, move |n| {
        let (client, url, bodies) = (client.clone(), format!("{base_url}/v1/accounts"), register_bodies.clone());
        async move { Ok(client.post(url).json(&bodies[n]).send().await?.status().as_u16()) }
    })
    .await?;
    println!();
    registration.print("registration");

    // Log everybody in (not timed).
    let mut ids = Vec::with_capacity(keyed.len());
    let mut tokens = Vec::with_capacity(keyed.len());
    for user in &keyed {
        tokens.push(user.login(&http, &base).await?);
        ids.push(user.user_id());
    }
    let (ids, tokens) = (Arc::new(ids), Arc::new(tokens));

    let fetch = {
        let (client, base_url, user_count) = (http.clone(), base.clone(), args.users);
        move || {
            let (client, base_url, ids, tokens) = (client.clone(), base_url.clone(), ids.clone(), tokens.clone());
            async move {
                let (requester, target) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..user_count), rng.random_range(0..user_count))
                };
                let response = client
                    .get(format!("{base_url}/v1/keys/{}", ids[target]))
                    .bearer_auth(&tokens[requester])
                    .send()
                    .await?;
                anyhow::Ok(response.status().as_u16())
            }
        }
    };
    let closed_fetch = fetch.clone();
    let closed = run_phase(args.fetches, args.concurrency, 200, move |_| closed_fetch()).await?;
    closed.print(&format!("bundle fetch, closed loop x{}", args.concurrency));
    let open = open_loop(args.rate, args.rate_seconds, args.concurrency, fetch).await?;
    open.print(&format!("bundle fetch, open loop {}/s x{}", args.rate, args.concurrency));

    let max_rate = closed.count as f64 / closed.elapsed.as_secs_f64();
    let open_rate = open.count as f64 / open.elapsed.as_secs_f64();
    let p99_ms = open.histogram.value_at_quantile(0.99) as f64 / 1000.0;
    println!();
    println!("Targets (each fetch appends a PreKeyClaimed event):");
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "  {:>6}: ≥ 1,000 bundle fetches/s: {max_rate:.0}/s at saturation ({:.2}× the target)",
        mark(max_rate >= 1000.0),
        max_rate / 1000.0
    );
    println!(
        "  {:>6}: p99 ≤ 50 ms at ≥ 1,000 fetches/s: {p99_ms:.1} ms at {open_rate:.0}/s (open loop, from scheduled send time)",
        mark(p99_ms <= 50.0 && open_rate >= 1000.0 * 0.98)
    );
    println!(
        "         at saturation (closed loop) p99 is {:.1} ms: queueing, not service time",
        closed.histogram.value_at_quantile(0.99) as f64 / 1000.0
    );
    let head = store.head().await?;
    let report = store.verify(privcomm_domain::Position(1), None).await?;
    anyhow::ensure!(report.first_break.is_none(), "chain broken: {:?}", report.first_break);
    println!("  log: {head} events, hash chain verified");
    // Release every connection before the caller drops the database.
    let _ = stop.send(());
    drop(http);
    let _ = server.await;
    drop(store);
    Ok(())
}
