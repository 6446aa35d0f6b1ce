//! `privcomm bench-replay`: fills a fresh log with N message events of about
//! P bytes each (PostgreSQL and SQLite), then times `privcomm replay` over it
//! as a child process — verifying the chain and rebuilding every read model
//! into a scratch SQLite file — and samples the child's resident memory.

use crate::bench::{BenchPostgres, ScratchDatabase};
use anyhow::Context as _;
use clap::Args;
use privcomm_domain::events::{Bytes, DomainEvent};
use privcomm_domain::{AppendRequest, ExpectedVersion, MessageId, StreamId, UserId};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of `privcomm bench-replay`.
#[derive(Args, Debug, Clone)]
pub struct BenchReplayArgs {
    #[command(flatten)]
    server: BenchPostgres,
    /// Events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Recipients (mailbox streams) the messages are spread over.
    #[arg(long, default_value_t = 1_000)]
    recipients: u64,
    /// Skip PostgreSQL.
    #[arg(long)]
    no_postgres: bool,
    /// Skip SQLite.
    #[arg(long)]
    no_sqlite: bool,
}

/// Runs the benchmark and prints figures.
pub async fn run(args: BenchReplayArgs) -> anyhow::Result<()> {
    println!(
        "privcomm bench-replay — {} cores, {} events of ≈{} B over {} mailboxes",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.events,
        args.payload_bytes,
        args.recipients
    );
    if !args.no_postgres {
        let db = ScratchDatabase::create(&args.server.postgres_url).await?;
        crate::migrate::migrate_up(&db.url).await?;
        let outcome = section("PostgreSQL", &db.url, &args).await;
        db.drop_database().await?;
        outcome?;
    }
    if !args.no_sqlite {
        let dir = std::env::temp_dir().join(format!("privcomm-bench-replay-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let url = format!("sqlite:{}", dir.join("log.db").display());
        crate::migrate::migrate_up(&url).await?;
        let outcome = section("SQLite", &url, &args).await;
        let _ = std::fs::remove_dir_all(&dir);
        outcome?;
    }
    Ok(())
}

async fn section(name: &str, url: &str, args: &BenchReplayArgs) -> anyhow::Result<()> {
    let store = crate::audit::open_log(url).await?;
    let started = Instant::now();
    fill(store.clone(), args).await?;
    let filled = started.elapsed().as_secs_f64();
    println!("{name}: filled {} events in {filled:.1} s ({:.0} events/s)", args.events, args.events as f64 / filled);
    drop(store);

    let exe = std::env::current_exe().context("locating the privcomm binary")?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args(["replay", "--no-compare", "--database-url", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting privcomm replay")?;
    let pid = child.id().context("replay pid")?;
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(rss) = rss_kib(pid) {
            peak_kib = peak_kib.max(rss);
        }
        tokio::select! {
            status = child.wait() => break status?,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        use tokio::io::AsyncReadExt as _;
        out.read_to_string(&mut stdout).await?;
    }
    anyhow::ensure!(status.success(), "replay failed:\n{stdout}");
    let summary = stdout.lines().next().unwrap_or_default();
    println!("{name}: {summary}");
    println!(
        "{name}: replay process {seconds:.1} s wall ({:.0} events/s including start-up), peak RSS {:.1} MiB",
        args.events as f64 / seconds,
        peak_kib as f64 / 1024.0
    );
    Ok(())
}

/// The resident set size of a process, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Appends `args.events` MessageAccepted events, 8 writers, 500 per append.
async fn fill(store: Arc<dyn crate::eventstore::LogStore>, args: &BenchReplayArgs) -> anyhow::Result<()> {
    const WRITERS: u64 = 8;
    const PER_APPEND: u64 = 500;
    // The JSON around the body is ≈230 bytes; Base64 makes the body 4/3 longer.
    let body_bytes = (args.payload_bytes.saturating_sub(230) * 3 / 4).max(1);
    let appends = args.events.div_ceil(PER_APPEND);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (store, recipients, total) = (store.clone(), args.recipients.max(1), args.events);
        writers.push(tokio::spawn(async move {
            let mut append = writer;
            while append < appends {
                let recipient = UserId(uuid::Uuid::from_u128(u128::from(append % recipients) + 1));
                let first = append * PER_APPEND;
                let mut events = Vec::new();
                for n in first..(first + PER_APPEND).min(total) {
                    let event = DomainEvent::MessageAccepted {
                        message_id: MessageId(uuid::Uuid::from_u128(u128::from(n) + 1)),
                        sender: UserId(uuid::Uuid::from_u128(7)),
                        recipient,
                        kind: "whisper".into(),
                        body: Bytes(vec![(n % 251) as u8; body_bytes]),
                    };
                    let id = privcomm_domain::mailbox::event_id(&event).context("mailbox event id")?;
                    events.push(event.to_new_event(id)?);
                }
                let request = AppendRequest {
                    stream_id: StreamId::for_mailbox(recipient),
                    expected: ExpectedVersion::Any,
                    events,
                };
                store.append(request).await?;
                append += WRITERS;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    Ok(())
}
