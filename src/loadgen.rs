//! `privcomm loadgen`: a relay load run. See docs/BENCHMARKS.md.
//!
//! It starts `--nodes` relay nodes as `privcomm serve` child processes on a
//! scratch PostgreSQL database and a private JetStream stream, registers
//! `--clients` users and connects them round-robin across the nodes, and
//! measures each node's resident memory before and after the connections
//! arrive (relay memory per connection). Then, unless `--idle`, it sends
//! `--rate` messages per second for `--seconds`, open loop: each message
//! leaves at its scheduled time whatever happened to earlier ones, and its
//! latency counts from that time (no coordinated omission). Receivers ack
//! every message and count duplicates; at the end, lost = scheduled −
//! received. The result is printed and written as JSON, and the latency as a
//! PNG plot. With `--idle` the clients stay connected, silent, for
//! `--seconds`, and the run reports memory and how many connections dropped.

use crate::bench::ScratchDatabase;
use crate::keygen::KeyedUser;
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rand::Rng as _;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Load-run settings.
#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub server: crate::bench::BenchPostgres,
    /// NATS server with JetStream.
    #[arg(long, env = "PRIVCOMM_BENCH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Relay nodes to start (`privcomm serve` processes).
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Connected clients (each one user).
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of sending (or, with `--idle`, of holding the connections).
    #[arg(long, default_value_t = 20)]
    pub seconds: u32,
    /// Body bytes per message.
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// Connect and hold the clients without sending: relay memory per idle connection.
    #[arg(long)]
    pub idle: bool,
    /// Write each node's log to `DIR/node-N.log`.
    #[arg(long)]
    pub node_logs: Option<PathBuf>,
    /// Runtime worker threads per node (`TOKIO_WORKER_THREADS`; default: one per core).
    #[arg(long)]
    pub node_threads: Option<usize>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "loadgen-result.json")]
    pub json: PathBuf,
    /// Where to write the PNG latency plot (not written with `--idle`).
    #[arg(long, default_value = "loadgen-latency.png")]
    pub plot: PathBuf,
    /// TrueType font for the plot's text (Debian: fonts-dejavu-core).
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    pub font: PathBuf,
}

/// A `privcomm serve` child process; killed when dropped.
struct NodeProcess {
    child: Child,
    address: SocketAddr,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl NodeProcess {
    fn spawn(
        db_url: &str,
        nats_url: &str,
        stream: &str,
        cache: usize,
        threads: Option<usize>,
        log_file: Option<PathBuf>,
    ) -> anyhow::Result<NodeProcess> {
        let exe = std::env::current_exe().context("finding the privcomm binary")?;
        let unlimited = "1000000/1s";
        let mut command = Command::new(exe);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", db_url)
            .env("NATS_URL", nats_url)
            .env("NATS_STREAM", stream)
            .env("SECRET_KEY", "loadgen-secret-key-loadgen-secret-key-0123")
            .env("RATE_LIMIT_REGISTRATION", unlimited)
            .env("RATE_LIMIT_TOKEN", unlimited)
            .env("RATE_LIMIT_KEY_BUNDLE", unlimited)
            .env("USER_CACHE_SIZE", cache.to_string())
            .env("RUST_LOG", "info,sqlx=warn,async_nats=warn,tower_http=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(threads) = threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        let mut child = command.spawn().context("starting a relay node")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (started, address) = std::sync::mpsc::channel();
        let tail = log_tail.clone();
        let mut log_file = match log_file {
            Some(path) => Some(std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?),
            None => None,
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = &mut log_file {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{line}");
                }
                let parsed: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if parsed["message"] == "privcomm serving" {
                    let _ = started.send(parsed["address"].as_str().unwrap_or_default().to_owned());
                }
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == 20 {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
        let mut node = NodeProcess { child, address: SocketAddr::from(([127, 0, 0, 1], 0)), log_tail };
        match address.recv_timeout(Duration::from_secs(60)) {
            Ok(text) => node.address = text.parse().with_context(|| format!("node address {text:?}"))?,
            Err(_) => anyhow::bail!("a relay node did not start; its last log lines: {:?}", node.tail()),
        }
        Ok(node)
    }

    fn tail(&self) -> Vec<String> {
        self.log_tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }

    /// Resident set size, from `/proc/<pid>/status`.
    fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the node's /proc status (Linux only)")?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
        let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
        Ok(kib * 1024)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's open-file limit to `wanted` (children inherit it):
/// the soft limit up to the hard one, and the hard one too where allowed (root).
fn raise_open_file_limit(wanted: u64) -> anyhow::Result<()> {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE)?;
    if soft >= wanted {
        return Ok(());
    }
    if rlimit::setrlimit(Resource::NOFILE, wanted, hard.max(wanted)).is_err() {
        rlimit::setrlimit(Resource::NOFILE, hard.min(wanted), hard)?;
    }
    let (now, _) = rlimit::getrlimit(Resource::NOFILE)?;
    anyhow::ensure!(
        now >= wanted,
        "this run needs {wanted} open files but the limit is {now}: run as root or raise `ulimit -Hn`"
    );
    Ok(())
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    errors: AtomicU64,
    closed: AtomicU64,
}

/// Latencies overall and per second of the run (by scheduled send time).
struct Latencies {
    all: Histogram<u64>,
    per_second: Vec<Histogram<u64>>,
    /// Send → `sent` (the commit), to tell accepting from delivering apart.
    accepted: Histogram<u64>,
}

impl Latencies {
    fn new(seconds: usize) -> anyhow::Result<Latencies> {
        let histogram = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
        Ok(Latencies {
            all: histogram()?,
            per_second: (0..seconds).map(|_| histogram()).collect::<Result<_, _>>()?,
            accepted: histogram()?,
        })
    }

    fn record(&mut self, second: usize, micros: u64) {
        let micros = micros.clamp(1, 60_000_000);
        let _ = self.all.record(micros);
        if let Some(histogram) = self.per_second.get_mut(second) {
            let _ = histogram.record(micros);
        }
    }
}

fn message_id(seq: u64) -> String {
    format!("0190b6c4-0000-7000-8000-{seq:012}")
}

/// Runs the load and prints and writes its result.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients >= 2 && args.nodes >= 1 && args.body_bytes >= 8 && args.rate >= 1 && args.seconds >= 1,
        "need ≥ 2 clients, ≥ 1 node, bodies ≥ 8 bytes, a rate and seconds ≥ 1"
    );
    // Each client is a socket here and one on a node; nodes inherit the limit.
    // Some 40 more descriptors are the database, NATS, HTTP and the runtime's own.
    raise_open_file_limit(args.clients as u64 + 64)?;
    let scratch = ScratchDatabase::create(&args.server.postgres_url).await?;
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
    let mut nodes = Vec::new();
    if let Some(dir) = &args.node_logs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for n in 0..args.nodes {
        let log_file = args.node_logs.as_ref().map(|dir| dir.join(format!("node-{n}.log")));
        nodes.push(NodeProcess::spawn(
            db_url,
            &args.nats_url,
            stream,
            args.clients + 100,
            args.node_threads,
            log_file,
        )?);
    }
    let what = if args.idle {
        format!("holding them idle for {} s", args.seconds)
    } else {
        format!("{} msg/s for {} s, {}-byte bodies", args.rate, args.seconds, args.body_bytes)
    };
    println!("privcomm loadgen — {} node processes, {} clients, {what}", args.nodes, args.clients);

    // Users, registered and logged in round-robin over the nodes (not timed).
    let clients = args.clients;
    let users = tokio::task::spawn_blocking(move || {
        (0..clients).map(|i| KeyedUser::new(&format!("+1888{i:08}"))).collect::<Vec<_>>()
    })
    .await?;
    let http = reqwest::Client::new();
    let bases: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.address)).collect();
    let registering = Instant::now();
    let tokens: Vec<String> = futures::stream::iter(users.iter().enumerate())
        .map(|(i, user)| {
            let (http, base) = (&http, &bases[i % bases.len()]);
            async move {
                user.register(http, base, 1 + i as u32 % 16_000).await?;
                user.login(http, base).await
            }
        })
        .buffered(32)
        .collect::<Vec<anyhow::Result<String>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    println!("registered and logged in {clients} users in {:.1} s", registering.elapsed().as_secs_f64());
    let ids: Vec<String> = users.iter().map(KeyedUser::user_id).collect();
    drop(users);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = nodes.iter().map(NodeProcess::rss_bytes).collect::<anyhow::Result<Vec<_>>>()?;

    // Connections, round-robin over the nodes.
    let total = if args.idle { 0 } else { u64::from(args.rate) * u64::from(args.seconds) };
    let seen: Arc<Vec<AtomicBool>> = Arc::new((0..total).map(|_| AtomicBool::new(false)).collect());
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(Latencies::new(args.seconds as usize)?));
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4 * 1024;
    config.write_buffer_size = 0;
    let connecting = Instant::now();
    let start_cell: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let connections = futures::stream::iter(tokens.iter().enumerate())
        .map(|(i, token)| {
            let url = format!("ws://{}/v1/websocket", nodes[i % nodes.len()].address);
            async move {
                let mut request = url.into_client_request()?;
                request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
                let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
                    .await
                    .context("connecting a client")?;
                anyhow::Ok(socket)
            }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await;
    let mut outboxes = Vec::with_capacity(clients);
    for socket in connections {
        let (mut sink, mut source) = socket?.split();
        let (outbox, mut outgoing) = mpsc::unbounded_channel::<String>();
        outboxes.push(outbox.clone());
        tokio::spawn(async move {
            while let Some(text) = outgoing.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let (seen, counters, latencies, start_cell) =
            (seen.clone(), counters.clone(), latencies.clone(), start_cell.clone());
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
                        if let (Some(flag), Some(start)) = (seen.get(seq as usize), start_cell.get()) {
                            if flag.swap(true, Ordering::Relaxed) {
                                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                            } else {
                                counters.received.fetch_add(1, Ordering::Relaxed);
                                let scheduled = *start + interval * seq as u32;
                                let micros = arrived.saturating_duration_since(scheduled).as_micros() as u64;
                                let second = scheduled.saturating_duration_since(*start).as_secs() as usize;
                                if let Ok(mut latencies) = latencies.lock() {
                                    latencies.record(second, micros);
                                }
                            }
                        }
                        if let Some(id) = frame["id"].as_str() {
                            let _ = outbox.send(json!({ "v": 1, "type": "ack", "id": id }).to_string());
                        }
                    }
                    Some("sent") => {
                        counters.accepted.fetch_add(1, Ordering::Relaxed);
                        let seq = frame["id"].as_str().and_then(|id| id.rsplit('-').next()?.parse::<u32>().ok());
                        if let (Some(seq), Some(start)) = (seq, start_cell.get()) {
                            let micros = start.elapsed().saturating_sub(interval * seq).as_micros() as u64;
                            if let Ok(mut latencies) = latencies.lock() {
                                let _ = latencies.accepted.record(micros.clamp(1, 60_000_000));
                            }
                        }
                    }
                    Some("error") => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            counters.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
    println!("connected {clients} clients in {:.1} s", connecting.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = nodes.iter().map(NodeProcess::rss_bytes).collect::<anyhow::Result<Vec<_>>>()?;
    let memory = memory_report(&rss_before, &rss_connected, clients);
    println!(
        "relay memory per connection: {:.0} bytes ({:.1} KiB)",
        memory["per_connection_bytes"].as_f64().unwrap_or_default(),
        memory["per_connection_bytes"].as_f64().unwrap_or_default() / 1024.0
    );

    let result = if args.idle {
        tokio::time::sleep(Duration::from_secs(u64::from(args.seconds))).await;
        let rss_after = nodes.iter().map(NodeProcess::rss_bytes).collect::<anyhow::Result<Vec<_>>>()?;
        json!({
            "mode": "idle", "nodes": args.nodes, "clients": args.clients, "seconds": args.seconds,
            "memory": memory,
            "rss_after_hold_bytes": rss_after,
            "dropped_connections": counters.closed.load(Ordering::Relaxed),
        })
    } else {
        // Open loop.
        let start = Instant::now() + Duration::from_secs(1);
        let _ = start_cell.set(start);
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
        let rss_after = nodes.iter().map(NodeProcess::rss_bytes).collect::<anyhow::Result<Vec<_>>>()?;
        let projection = projection_delays(&bases).await;
        let received = counters.received.load(Ordering::Relaxed);
        let latencies = latencies.lock().map_err(|_| anyhow::anyhow!("latency lock poisoned"))?;
        let elapsed = sending_ended.saturating_duration_since(start).as_secs_f64().max(1e-9);
        let ms = |q: f64| latencies.all.value_at_quantile(q) as f64 / 1000.0;
        let result = json!({
            "mode": "load", "nodes": args.nodes, "node_threads": args.node_threads, "clients": args.clients, "rate": args.rate, "seconds": args.seconds, "body_bytes": args.body_bytes,
            "scheduled": total,
            "accepted": counters.accepted.load(Ordering::Relaxed),
            "received": received,
            "lost": total - received,
            "duplicates": counters.duplicates.load(Ordering::Relaxed),
            "errors": counters.errors.load(Ordering::Relaxed),
            "dropped_connections": counters.closed.load(Ordering::Relaxed),
            "throughput_per_s": received as f64 / elapsed,
            "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": latencies.all.max() as f64 / 1000.0 },
            "accept_latency_ms": {
                "p50": latencies.accepted.value_at_quantile(0.5) as f64 / 1000.0,
                "p99": latencies.accepted.value_at_quantile(0.99) as f64 / 1000.0,
                "max": latencies.accepted.max() as f64 / 1000.0,
            },
            "memory": memory,
            "rss_after_run_bytes": rss_after,
            "projection_delay_s": projection,
        });
        let title = format!(
            "privcomm loadgen: {} msg/s, {} clients, {} nodes, {} B bodies",
            args.rate, args.clients, args.nodes, args.body_bytes
        );
        crate::plot::latency_png(&args.plot, &args.font, &title, &latencies.all, &latencies.per_second)
            .with_context(|| format!("writing the latency plot {}", args.plot.display()))?;
        println!("latency plot written to {}", args.plot.display());
        result
    };
    println!("{}", serde_json::to_string_pretty(&result)?);
    std::fs::write(&args.json, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("written to {}", args.json.display());
    for node in &nodes {
        let warnings = node.tail().into_iter().filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\"")).count();
        if warnings > 0 {
            println!(
                "node {}: {warnings} warnings or errors among its last log lines: {:?}",
                node.address,
                node.tail()
            );
        }
    }
    Ok(())
}

/// Per node and overall: resident memory before and after the connections,
/// and the growth divided by the connections it holds.
fn memory_report(before: &[u64], after: &[u64], clients: usize) -> Value {
    let nodes = before.len();
    let per_node: Vec<Value> = before
        .iter()
        .zip(after)
        .enumerate()
        .map(|(i, (before, after))| {
            let connections = clients / nodes + usize::from(i < clients % nodes);
            json!({
                "connections": connections,
                "rss_before_bytes": before,
                "rss_connected_bytes": after,
                "per_connection_bytes": after.saturating_sub(*before) as f64 / connections.max(1) as f64,
            })
        })
        .collect();
    let growth: u64 = before.iter().zip(after).map(|(b, a)| a.saturating_sub(*b)).sum();
    json!({ "per_connection_bytes": growth as f64 / clients.max(1) as f64, "nodes": per_node })
}

/// The projection workers' commit-to-applied delay over the run, per read
/// model, from the `/metrics` of whichever node runs them.
async fn projection_delays(bases: &[String]) -> Value {
    let http = reqwest::Client::new();
    let mut models = serde_json::Map::new();
    for base in bases {
        let Ok(response) = http.get(format!("{base}/metrics")).send().await else { continue };
        let Ok(text) = response.text().await else { continue };
        for line in text.lines().filter(|l| l.starts_with("privcomm_projection_delay_seconds{")) {
            let Some((labels, value)) = line.split_once("} ") else { continue };
            let model = labels.split("model=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
            let quantile = labels.split("quantile=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
            let entry = models.entry(model.to_owned()).or_insert_with(|| json!({}));
            let key = match quantile {
                "0.5" => "p50",
                "0.99" => "p99",
                "1" | "1.0" => "max",
                _ => continue,
            };
            entry[key] = json!(value.trim().parse::<f64>().unwrap_or_default());
        }
    }
    Value::Object(models)
}
