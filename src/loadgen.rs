//! `privcomm loadgen`: a relay load run. See docs/BENCHMARKS.md.
//!
//! It starts `--nodes` relay nodes in this process, each with its own
//! PostgreSQL pool, NATS connection, outbox publisher and presence, on a
//! scratch database and a private JetStream stream; registers `--clients`
//! users and connects them round-robin across the nodes; then sends
//! `--rate` messages per second for `--seconds`, open loop: each message
//! leaves at its scheduled time whatever happened to earlier ones, and its
//! latency counts from that time (no coordinated omission). Receivers ack
//! every message and count duplicates; at the end, lost = scheduled −
//! received. The result is printed and written as JSON.

use crate::bench::ScratchDatabase;
use crate::bus::nats::{NatsBus, NatsBusConfig};
use crate::clock::SystemClock;
use crate::eventstore::LogStore;
use crate::eventstore::postgres::{PoolSize, PostgresEventStore};
use crate::keygen::KeyedUser;
use crate::outbox::OutboxPublisher;
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use privcomm_api::limits::{RateLimit, RateLimits};
use rand::Rng as _;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Load-run settings.
#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// A PostgreSQL URL whose role may create databases.
    #[arg(
        long,
        env = "PRIVCOMM_BENCH_POSTGRES_URL",
        default_value = "postgres://privcomm:privcomm@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// NATS server with JetStream.
    #[arg(long, env = "PRIVCOMM_BENCH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Relay nodes to start.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Connected clients (each one user).
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20)]
    pub seconds: u32,
    /// Body bytes per message.
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// Where to write the JSON result.
    #[arg(long, default_value = "loadgen-result.json")]
    pub json: std::path::PathBuf,
}

struct Node {
    address: SocketAddr,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

async fn start_node(
    db_url: &str,
    nats_url: &str,
    stream: &str,
    config: &privcomm_api::ApiConfig,
) -> anyhow::Result<Node> {
    let pool = crate::eventstore::postgres::connect_pool(db_url, PoolSize { min: 2, max: 10 }).await?;
    let store: Arc<dyn LogStore> = Arc::new(PostgresEventStore::open(pool, Arc::new(SystemClock)).await?);
    let links =
        crate::serve::Links::nats(Arc::new(NatsBus::connect(nats_url, NatsBusConfig::for_stream(stream)).await?));
    let bus = links.bus.clone();
    let (stop, stopped) = watch::channel(false);
    let outbox_stop = {
        let mut stopped = stopped.clone();
        async move { crate::serve::wait_until_true(&mut stopped).await }
    };
    tokio::spawn(OutboxPublisher::new(store.clone(), bus.clone()).run(outbox_stop));
    let app = crate::serve::build_app(
        store,
        links,
        Arc::new(SystemClock),
        config,
        privcomm_relay::RelaySettings::default(),
        stopped.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let mut stopped = stopped;
        let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { crate::serve::wait_until_true(&mut stopped).await })
            .await;
    });
    Ok(Node { address, stop, server })
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    errors: AtomicU64,
}

fn message_id(seq: u64) -> String {
    format!("0190b6c4-0000-7000-8000-{seq:012}")
}

/// Runs the load and prints and writes its result.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients >= 2 && args.nodes >= 1 && args.body_bytes >= 8,
        "need ≥ 2 clients, ≥ 1 node, bodies ≥ 8 bytes"
    );
    let scratch = ScratchDatabase::create(&args.postgres_url).await?;
    let stream = format!("PRIVCOMM_LOADGEN_{}", uuid::Uuid::now_v7().simple());
    let outcome = load(&args, &scratch.url, &stream).await;
    if let Ok(client) = async_nats::connect(&args.nats_url).await {
        let _ = async_nats::jetstream::new(client).delete_stream(&stream).await;
    }
    scratch.drop_database().await?;
    outcome
}

async fn load(args: &LoadgenArgs, db_url: &str, stream: &str) -> anyhow::Result<()> {
    crate::migrate::migrate_up(db_url).await?;
    let unlimited = RateLimit { requests: 1_000_000, per: Duration::from_secs(1) };
    let config = privcomm_api::ApiConfig {
        secret_key: b"loadgen-secret-key-loadgen-secret-key-0123".to_vec(),
        tokens: Default::default(),
        rate_limits: RateLimits { registration: unlimited, key_bundle: unlimited, token_issue: unlimited },
        cors_origins: vec![],
        user_cache_capacity: args.clients + 100,
    };
    let mut nodes = Vec::new();
    for _ in 0..args.nodes {
        nodes.push(start_node(db_url, &args.nats_url, stream, &config).await?);
    }
    println!(
        "privcomm loadgen — {} nodes, {} clients, {} msg/s for {} s, {}-byte bodies",
        args.nodes, args.clients, args.rate, args.seconds, args.body_bytes
    );

    // Users, registered and logged in (not timed).
    let clients = args.clients;
    let users = tokio::task::spawn_blocking(move || {
        (0..clients).map(|i| KeyedUser::new(&format!("+1888{i:08}"))).collect::<Vec<_>>()
    })
    .await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", nodes[0].address);
    let mut tokens = Vec::with_capacity(users.len());
    for (i, user) in users.iter().enumerate() {
        user.register(&http, &base, 1 + i as u32 % 16_000).await?;
        tokens.push(user.login(&http, &base).await?);
    }
    let ids: Vec<String> = users.iter().map(KeyedUser::user_id).collect();

    // Connections, round-robin over the nodes.
    let total = u64::from(args.rate) * u64::from(args.seconds);
    let seen: Arc<Vec<AtomicBool>> = Arc::new((0..total).map(|_| AtomicBool::new(false)).collect());
    let counters = Arc::new(Counters::default());
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start = Instant::now() + Duration::from_secs(2);
    let mut outboxes = Vec::with_capacity(clients);
    for (i, token) in tokens.iter().enumerate() {
        let node = &nodes[i % nodes.len()];
        let mut request = format!("ws://{}/v1/websocket", node.address).into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(request).await.context("connecting a client")?;
        let (mut sink, mut source) = socket.split();
        let (outbox, mut outgoing) = mpsc::unbounded_channel::<String>();
        outboxes.push(outbox.clone());
        tokio::spawn(async move {
            while let Some(text) = outgoing.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let (seen, counters, histogram) = (seen.clone(), counters.clone(), histogram.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = source.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                match frame["type"].as_str() {
                    Some("message") => {
                        let arrived = Instant::now();
                        let body = frame["body"].as_str().and_then(|b| STANDARD.decode(b).ok()).unwrap_or_default();
                        let seq =
                            body.get(..8).map_or(u64::MAX, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
                        if let Some(flag) = seen.get(seq as usize) {
                            if flag.swap(true, Ordering::Relaxed) {
                                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                            } else {
                                counters.received.fetch_add(1, Ordering::Relaxed);
                                let scheduled = start + interval * seq as u32;
                                let micros = arrived.saturating_duration_since(scheduled).as_micros() as u64;
                                let _ = histogram.lock().map(|mut h| h.record(micros.max(1)));
                            }
                        }
                        if let Some(id) = frame["id"].as_str() {
                            let _ = outbox.send(json!({ "v": 1, "type": "ack", "id": id }).to_string());
                        }
                    }
                    Some("sent") => {
                        counters.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("error") => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }

    // Open loop.
    let padding = "x".repeat(args.body_bytes - 8);
    let mut rng = rand::rng();
    for seq in 0..total {
        tokio::time::sleep_until(start + interval * seq as u32).await;
        let sender = rng.random_range(0..clients);
        let mut recipient = rng.random_range(0..clients - 1);
        if recipient >= sender {
            recipient += 1;
        }
        let mut body = seq.to_le_bytes().to_vec();
        body.extend_from_slice(padding.as_bytes());
        let frame = json!({ "v": 1, "type": "send", "id": message_id(seq), "to": ids[recipient], "kind": "load", "body": STANDARD.encode(&body) });
        let _ = outboxes[sender].send(frame.to_string());
    }
    let sending_ended = Instant::now();
    let deadline = sending_ended + Duration::from_secs(15);
    while counters.received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // late duplicates would show up now

    let received = counters.received.load(Ordering::Relaxed);
    let histogram = histogram.lock().map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?.clone();
    let elapsed = sending_ended.saturating_duration_since(start).as_secs_f64().max(1e-9);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let result = json!({
        "nodes": args.nodes, "clients": args.clients, "rate": args.rate, "seconds": args.seconds, "body_bytes": args.body_bytes,
        "scheduled": total,
        "accepted": counters.accepted.load(Ordering::Relaxed),
        "received": received,
        "lost": total - received,
        "duplicates": counters.duplicates.load(Ordering::Relaxed),
        "errors": counters.errors.load(Ordering::Relaxed),
        "throughput_per_s": received as f64 / elapsed,
        "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": histogram.max() as f64 / 1000.0 },
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    std::fs::write(&args.json, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("written to {}", args.json.display());
    for node in nodes {
        let _ = node.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), node.server).await;
    }
    Ok(())
}
