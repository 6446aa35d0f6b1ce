//! `privcomm bench-store`: append and replay throughput of the event store,
//! with PostgreSQL's own `pgbench -b simple-update` measured in the same run
//! on the same server as the yardstick. See docs/BENCHMARKS.md.

use crate::clock::SystemClock;
use crate::eventstore::LogStore;
use crate::eventstore::postgres::{PoolSize, PostgresEventStore};
use crate::eventstore::sqlite::SqliteEventStore;
use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use privcomm_domain::{AppendRequest, EventId, ExpectedVersion, NewEvent, Position, StreamId, StreamVersion};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

/// The PostgreSQL server every benchmark and load run works on, in a
/// scratch database of its own that it drops at the end.
#[derive(Args, Debug, Clone)]
pub struct BenchPostgres {
    /// A PostgreSQL URL whose role may create databases.
    #[arg(
        long,
        env = "PRIVCOMM_BENCH_POSTGRES_URL",
        default_value = "postgres://privcomm:privcomm@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
}

/// Benchmark settings.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub server: BenchPostgres,
    /// Events appended one per transaction by one writer.
    #[arg(long, default_value_t = 3_000)]
    pub single_events: usize,
    /// Events appended in batched appends.
    #[arg(long, default_value_t = 100_000)]
    pub batched_events: usize,
    /// Events per batched append.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Concurrent writers for the concurrent runs (and pgbench clients).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10)]
    pub pgbench_seconds: u32,
    /// Skip SQLite.
    #[arg(long)]
    pub no_sqlite: bool,
}

#[derive(Default)]
struct Figures {
    single: f64,
    concurrent_single: f64,
    batched: f64,
    replay: f64,
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    println!(
        "privcomm bench-store — {} cores, payload {} B",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.payload_bytes
    );

    let admin = sqlx::PgPool::connect(&args.server.postgres_url)
        .await
        .with_context(|| format!("connecting to {}", args.server.postgres_url))?;
    let name = format!("privcomm_bench_{}", Uuid::now_v7().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
    let url = format!(
        "{}/{name}",
        args.server.postgres_url.rsplit_once('/').map_or(args.server.postgres_url.as_str(), |(base, _)| base)
    );
    let outcome = postgres_section(&args, &url).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&admin).await?;
    let (pg, pgbench_1, pgbench_n) = outcome?;

    println!();
    println!("PostgreSQL targets:");
    verdict("single append ≥ 0.5 × pgbench (1 client)", pg.single, 0.5 * pgbench_1);
    verdict(&format!("batched append ≥ 3 × pgbench ({} clients)", args.concurrency), pg.batched, 3.0 * pgbench_n);
    verdict("replay read ≥ 10 × batched append", pg.replay, 10.0 * pg.batched);

    if !args.no_sqlite {
        let dir = std::env::temp_dir().join(format!("privcomm-bench-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let url = format!("sqlite:{}", dir.join("bench.db").display());
        crate::migrate::migrate_up(&url).await?;
        let (readers, writer) = crate::eventstore::sqlite::connect_pools(&url).await?;
        let store: Arc<dyn LogStore> = Arc::new(SqliteEventStore::open(readers, writer, Arc::new(SystemClock)).await?);
        println!();
        println!("SQLite (WAL, synchronous=FULL):");
        let sqlite = measure(store, &args).await?;
        let _ = std::fs::remove_dir_all(&dir);
        println!("  replay/batched = {:.1}×", sqlite.replay / sqlite.batched);
    }
    Ok(())
}

/// A database of the benchmark's own on the server at `admin_url`, dropped
/// afterwards (`scripts/test` also drops any left by an interrupted run).
pub struct ScratchDatabase {
    admin: sqlx::PgPool,
    name: String,
    /// Its URL.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `privcomm_bench_<random>`.
    pub async fn create(admin_url: &str) -> anyhow::Result<ScratchDatabase> {
        let admin = sqlx::PgPool::connect(admin_url).await.with_context(|| format!("connecting to {admin_url}"))?;
        let name = format!("privcomm_bench_{}", Uuid::now_v7().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .context("creating the benchmark database (the role needs CREATEDB)")?;
        let url = format!("{}/{name}", admin_url.rsplit_once('/').map_or(admin_url, |(base, _)| base));
        Ok(ScratchDatabase { admin, name, url })
    }

    /// Drops it, closing any connection left open.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&self.admin)
            .await?;
        Ok(())
    }
}

async fn postgres_section(args: &BenchArgs, url: &str) -> anyhow::Result<(Figures, f64, f64)> {
    crate::migrate::migrate_up(url).await?;
    let pool = crate::eventstore::postgres::connect_pool(url, PoolSize { min: 2, max: 20 }).await?;
    let store: Arc<dyn LogStore> = Arc::new(PostgresEventStore::open(pool, Arc::new(SystemClock)).await?);
    println!();
    println!("PostgreSQL:");
    let figures = measure(store, args).await?;
    println!();
    println!("pgbench -b simple-update (yardstick, same server, same database):");
    pgbench(url, &["-i", "-q", "-s", "1"]).context("pgbench -i (is pgbench installed? Debian: postgresql-client)")?;
    let seconds = args.pgbench_seconds.to_string();
    let one = pgbench(url, &["-n", "-b", "simple-update", "-c", "1", "-j", "1", "-T", &seconds])?;
    println!("  1 client: {one:>10.0} TPS");
    let clients = args.concurrency.to_string();
    let threads = args.concurrency.min(2).to_string();
    let many = pgbench(url, &["-n", "-b", "simple-update", "-c", &clients, "-j", &threads, "-T", &seconds])?;
    println!("  {clients} clients: {many:>9.0} TPS");
    Ok((figures, one, many))
}

fn new_event(payload_bytes: usize) -> NewEvent {
    NewEvent {
        event_id: EventId(Uuid::now_v7()),
        event_type: "BenchmarkEventAppended".into(),
        schema_version: 1,
        payload: vec![b'x'; payload_bytes],
    }
}

async fn measure(store: Arc<dyn LogStore>, args: &BenchArgs) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();

    // 1. One writer, one event per append = one transaction per event.
    let mut latency = Histogram::<u64>::new(3)?;
    let stream = StreamId::new("bench-single")?;
    let started = Instant::now();
    for n in 0..args.single_events {
        let request = AppendRequest {
            stream_id: stream.clone(),
            expected: ExpectedVersion::Exact(StreamVersion(n as u64)),
            events: vec![new_event(args.payload_bytes)],
        };
        let t = Instant::now();
        store.append(request).await?;
        latency.record(t.elapsed().as_micros() as u64)?;
    }
    figures.single = args.single_events as f64 / started.elapsed().as_secs_f64();
    println!(
        "  single append, 1 writer:           {:>10.0} events/s  (p50 {} µs, p99 {} µs)",
        figures.single,
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99)
    );

    // 2. Many writers, one event per append: the group committer batches them.
    let per_writer = args.single_events.div_ceil(args.concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..args.concurrency {
        let store = store.clone();
        let payload_bytes = args.payload_bytes;
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("bench-concurrent-{writer}"))?;
            for n in 0..per_writer {
                store
                    .append(AppendRequest {
                        stream_id: stream.clone(),
                        expected: ExpectedVersion::Exact(StreamVersion(n as u64)),
                        events: vec![new_event(payload_bytes)],
                    })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    figures.concurrent_single = (per_writer * args.concurrency) as f64 / started.elapsed().as_secs_f64();
    println!(
        "  single append, {:>2} writers:         {:>10.0} events/s  (group commit)",
        args.concurrency, figures.concurrent_single
    );

    // 3. Batched appends from concurrent writers.
    let appends = args.batched_events / args.batch_size;
    let per_writer = appends.div_ceil(args.concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..args.concurrency {
        let store = store.clone();
        let (payload_bytes, batch_size) = (args.payload_bytes, args.batch_size);
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("bench-batched-{writer}"))?;
            for n in 0..per_writer {
                let events = (0..batch_size).map(|_| new_event(payload_bytes)).collect();
                store
                    .append(AppendRequest {
                        stream_id: stream.clone(),
                        expected: ExpectedVersion::Exact(StreamVersion((n * batch_size) as u64)),
                        events,
                    })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let batched_events = per_writer * args.concurrency * args.batch_size;
    figures.batched = batched_events as f64 / started.elapsed().as_secs_f64();
    println!(
        "  batched append ({} per append, {} writers): {:>7.0} events/s",
        args.batch_size, args.concurrency, figures.batched
    );

    // 4. Replay: read the whole log in pages, as a projection rebuild does.
    let head = store.head().await?;
    let started = Instant::now();
    let mut after = Position::START;
    let mut read = 0usize;
    loop {
        let page = store.read_all(after, 5_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        read += page.len();
    }
    figures.replay = read as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(read as u64 == head.0, "replay read {read} events, the head is {head}");
    println!("  replay (read_all, 5,000 per page): {:>10.0} events/s  ({read} events)", figures.replay);

    let started = Instant::now();
    let report = store.verify(Position(1), None).await?;
    anyhow::ensure!(report.first_break.is_none(), "chain broken: {:?}", report.first_break);
    println!(
        "  verify (read + hash chain):        {:>10.0} events/s",
        report.checked as f64 / started.elapsed().as_secs_f64()
    );
    Ok(figures)
}

fn verdict(what: &str, measured: f64, target: f64) {
    let ratio = measured / target;
    let mark = if measured >= target { "met" } else { "MISSED" };
    println!("  {mark:>6}: {what}: {measured:.0} vs {target:.0} ({:.2}× the target)", ratio);
}

/// Runs pgbench against `url` and returns its TPS (for runs) or 0 (for -i).
fn pgbench(url: &str, args: &[&str]) -> anyhow::Result<f64> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(credentials, _)| credentials.split_once(':'))
        .map(|(_, password)| password.to_owned());
    let mut command = Command::new("pgbench");
    command
        .args(["-h", options.get_host(), "-p", &options.get_port().to_string(), "-U", options.get_username()])
        .args(args)
        .arg(options.get_database().unwrap_or("postgres"));
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command.output().context("running pgbench")?;
    anyhow::ensure!(output.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or(0.0))
}
