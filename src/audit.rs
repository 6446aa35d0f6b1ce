//! The auditor's commands: `privcomm export`, `privcomm audit identity`,
//! `privcomm audit verify`, `privcomm replay`, and `privcomm retention
//! run-now` for operators. They open the log read-only (no lock, no
//! migration), so they run beside a serving node.

use crate::config::DEFAULT_DATABASE_URL;
use crate::eventstore::{Backend, LogStore};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use privcomm_domain::events::DomainEvent;
use privcomm_domain::{Position, StreamId, StreamVersion, UserId};
use privcomm_projections::export::NdjsonSource;
use privcomm_projections::models;
use privcomm_projections::replay::{AuditOutcome, EventSource, StoreSource, audited_pages, default_parallelism};
use privcomm_projections::store::{ReadDb, ReadStore, SqlReadStore};
use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Which log to read.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Event store: `sqlite:PATH` or `postgres://…`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Opens the log at `url` for reading (and for retention's appends), without
/// the embedded mode's file lock and without migrating.
pub async fn open_log(url: &str) -> anyhow::Result<Arc<dyn LogStore>> {
    let clock = Arc::new(crate::clock::SystemClock);
    match Backend::of_url(url) {
        Some(Backend::Postgres) => {
            let size = crate::eventstore::postgres::PoolSize { min: 1, max: 4 };
            let pool =
                crate::eventstore::postgres::connect_pool(url, size).await.context("connecting to PostgreSQL")?;
            Ok(Arc::new(crate::eventstore::postgres::PostgresEventStore::open(pool, clock).await?))
        }
        Some(Backend::Sqlite) => {
            let path = crate::serve::sqlite_path(url);
            anyhow::ensure!(path.exists(), "no database at {} (DATABASE_URL={url})", path.display());
            let (readers, writer) = crate::eventstore::sqlite::connect_pools(url).await.context("opening SQLite")?;
            Ok(Arc::new(crate::eventstore::sqlite::SqliteEventStore::open(readers, writer, clock).await?))
        }
        None => anyhow::bail!("DATABASE_URL must start with postgres://, postgresql:// or sqlite:"),
    }
}

/// `privcomm export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    log: LogArgs,
    /// Where to write the NDJSON (`-` for standard output).
    #[arg(long, short, default_value = "-")]
    output: String,
    /// Stop at this position (default: the head when the export starts).
    #[arg(long)]
    until: Option<u64>,
}

/// Writes the log as NDJSON.
pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let store = open_log(&args.log.database_url).await?;
    let until = match args.until {
        Some(until) => Position(until),
        None => store.head().await?,
    };
    let mut out = output_to(&args.output)?;
    let written = privcomm_projections::export::export(store.as_ref(), &mut out, 5_000, Some(until)).await?;
    drop(out);
    eprintln!("exported {written} events (positions 1..={until})");
    Ok(())
}

/// `privcomm audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// A user's identity-key and signed-prekey history, from the log.
    Identity {
        #[command(flatten)]
        log: LogArgs,
        /// The user id (UUID).
        user: String,
    },
    /// Verify an export offline: hash chain, compaction records, decodability,
    /// and that it carries the hash of every given signed checkpoint.
    Verify {
        /// The NDJSON file written by `privcomm export`.
        file: PathBuf,
        /// Signed checkpoints to hold the export to (NDJSON from `privcomm audit checkpoints`).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// The server's checkpoint public key (hex), pinned by the auditor.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// The server's signed checkpoints, as NDJSON, for auditors to keep.
    Checkpoints {
        #[command(flatten)]
        log: LogArgs,
        /// Where to write them (`-` for standard output).
        #[arg(long, short, default_value = "-")]
        output: String,
    },
}

/// Runs an audit command.
pub async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Identity { log, user } => identity(&log.database_url, &user).await,
        AuditCommand::Verify { file, checkpoints, public_key } => {
            verify(&file, checkpoints.as_deref(), public_key.as_deref()).await
        }
        AuditCommand::Checkpoints { log, output } => {
            let db = crate::projector::open_read_db(&log.database_url).await?;
            let checkpoints = privcomm_projections::checkpoints::all(&db).await?;
            let mut out = output_to(&output)?;
            for checkpoint in &checkpoints {
                serde_json::to_writer(&mut out, checkpoint)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            eprintln!("{} signed checkpoints", checkpoints.len());
            Ok(())
        }
    }
}

async fn identity(url: &str, user: &str) -> anyhow::Result<()> {
    let user = UserId(uuid::Uuid::parse_str(user).with_context(|| format!("{user:?} is not a user id (a UUID)"))?);
    let store = open_log(url).await?;
    let stream = StreamId::for_user(user);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>10}  {:<24}  {:<22}  {:<18}  {:<13}  {:<18}",
        "position", "recorded (UTC)", "change", "identity key", "signed prekey", "signed key"
    )?;
    let mut after = StreamVersion(0);
    let mut entries = 0;
    loop {
        let page = store.read_stream(&stream, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.stream_version;
        for recorded in &page {
            let event = match DomainEvent::for_fold(recorded) {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(error) => anyhow::bail!("position {}: {error}", recorded.position),
            };
            let (change, identity, signed) = match &event {
                DomainEvent::UserRegistered { keys, .. } => {
                    ("registered", Some(&keys.identity_key), &keys.signed_prekey)
                }
                DomainEvent::IdentityKeyChanged { keys, .. } => {
                    ("identity key changed", Some(&keys.identity_key), &keys.signed_prekey)
                }
                DomainEvent::SignedPreKeyRotated { signed_prekey, .. } => {
                    ("signed prekey rotated", None, signed_prekey)
                }
                _ => continue,
            };
            // Fingerprints, not keys: SHA-256 of the public bytes, 16 hex digits.
            let short = |bytes: &[u8]| privcomm_domain::Hash::of(bytes).to_hex()[..16].to_owned();
            writeln!(
                out,
                "{:>10}  {:<24}  {:<22}  {:<18}  {:<13}  {:<18}",
                recorded.position.0,
                utc(recorded.recorded_at.0),
                change,
                identity.map_or_else(|| "(unchanged)".to_owned(), |k| short(&k.0)),
                signed.id.0,
                short(&signed.public_key.0),
            )?;
            entries += 1;
        }
    }
    anyhow::ensure!(entries > 0, "user {} has no identity in the log", user.0);
    Ok(())
}

fn output_to(output: &str) -> anyhow::Result<Box<dyn std::io::Write>> {
    Ok(if output == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
    } else {
        let file = std::fs::File::create(output).with_context(|| format!("creating {output}"))?;
        Box::new(std::io::BufWriter::new(file))
    })
}

async fn verify(
    file: &std::path::Path,
    checkpoints: Option<&std::path::Path>,
    public_key: Option<&str>,
) -> anyhow::Result<()> {
    use privcomm_projections::checkpoints::{CheckpointChecker, SignedCheckpoint};
    let signed: Vec<SignedCheckpoint> = match checkpoints {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1)))
                .collect::<anyhow::Result<_>>()?
        }
    };
    if !signed.is_empty() && public_key.is_none() {
        eprintln!("warning: no --public-key pinned; checkpoint signatures are checked against the key each one names");
    }
    let mut checker =
        CheckpointChecker::new(signed, public_key).map_err(|e| anyhow::anyhow!("verification FAILED: {e}"))?;
    let reader = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let source = Box::new(NdjsonSource::new(std::io::BufReader::new(reader), 10_000));
    let started = Instant::now();
    let (mut pages, auditing) = audited_pages(source, default_parallelism());
    let mut last = Position::START;
    let mut checkpoint_fault = None;
    'pages: while let Some(page) = pages.recv().await {
        for decoded in &page {
            last = decoded.event.position;
            if let Err(fault) = checker.observe(&decoded.event) {
                checkpoint_fault = Some(fault);
                break 'pages;
            }
        }
    }
    drop(pages);
    let AuditOutcome { auditor, fault, io_error } = auditing.await?;
    if let Some(fault) = checkpoint_fault {
        anyhow::bail!("verification FAILED at {fault}");
    }
    if let Some(reason) = io_error {
        anyhow::bail!("reading {}: {reason}", file.display());
    }
    if let Some(fault) = fault.or_else(|| auditor.finish().err()) {
        anyhow::bail!("verification FAILED at {fault}");
    }
    let matched = checker.finish(last).map_err(|fault| anyhow::anyhow!("verification FAILED at {fault}"))?;
    println!(
        "verified {} events (positions 1..={}), {} signed checkpoints matched, {} payloads compacted, head hash {} in {:.2} s",
        auditor.events(),
        last,
        matched,
        auditor.dropped(),
        auditor.head_hash(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `privcomm replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    log: LogArgs,
    /// Replay an export (NDJSON) instead of the live log; nothing is compared.
    #[arg(long)]
    from: Option<PathBuf>,
    /// An empty database to rebuild into (`sqlite:PATH` or `postgres://…`);
    /// by default a temporary SQLite file, removed afterwards.
    #[arg(long)]
    into: Option<String>,
    /// Keep the temporary database and print where it is.
    #[arg(long)]
    keep: bool,
    /// Rebuild to the head and compare nothing (benchmarks, or when no live models exist).
    #[arg(long)]
    no_compare: bool,
    /// Events per page.
    #[arg(long, default_value_t = 10_000)]
    page: usize,
}

/// Rebuilds every read model, verifies the chain, compares with the live models.
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let all = models::all();
    let (target_url, temporary) = match &args.into {
        Some(url) => (url.clone(), None),
        None => {
            let path = std::env::temp_dir().join(format!("privcomm-replay-{}.db", uuid::Uuid::now_v7()));
            (format!("sqlite:{}", path.display()), Some(path))
        }
    };
    let target = open_replay_target(&target_url).await?;
    let target_store = SqlReadStore::new(target);

    let mut limits = HashMap::new();
    let mut live_snapshots = Vec::new();
    let started = Instant::now();
    let mut progress = Progress::new();
    let source: Box<dyn EventSource> = match &args.from {
        Some(file) => {
            let reader = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            Box::new(NdjsonSource::new(std::io::BufReader::new(reader), args.page))
        }
        None => {
            let store = open_log(&args.log.database_url).await?;
            let head = store.head().await?;
            progress.total = Some(head.0);
            // Each live model is compared at its own checkpoint, read with its checksums in one snapshot.
            if !args.no_compare {
                let live = SqlReadStore::new(crate::projector::open_read_db(&args.log.database_url).await?);
                for model in &all {
                    let snapshot = live.snapshot(model.as_ref()).await?;
                    limits.insert(model.name(), snapshot.checkpoint);
                    live_snapshots.push((model.clone(), snapshot));
                }
            }
            Box::new(StoreSource::new(store, args.page, Some(head)))
        }
    };
    let report =
        privcomm_projections::replay::replay(source, &target_store, &all, &limits, |n, p| progress.show(n, p)).await?;
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "replayed {} events (positions 1..={}) in {seconds:.2} s ({:.0} events/s); {} payloads compacted; head hash {}",
        report.events,
        report.head,
        report.events as f64 / seconds.max(1e-9),
        report.dropped_payloads,
        report.head_hash,
    );
    let mut differences = 0;
    for (model, live) in &live_snapshots {
        let rebuilt = target_store.snapshot(model.as_ref()).await?;
        for ((table, live_sum), (_, rebuilt_sum)) in live.tables.iter().zip(&rebuilt.tables) {
            let same = live_sum == rebuilt_sum;
            differences += usize::from(!same);
            println!(
                "  {:<16} {:<22} at {:>9}: live {:>8} rows {}  rebuilt {:>8} rows {}  {}",
                model.name(),
                table,
                live.checkpoint.0,
                live_sum.rows,
                &live_sum.to_hex()[..16],
                rebuilt_sum.rows,
                &rebuilt_sum.to_hex()[..16],
                if same { "same" } else { "DIFFERENT" }
            );
        }
    }
    if args.from.is_none() && args.no_compare {
        println!("  (not compared with the live read models: --no-compare)");
    }
    match (&temporary, args.keep) {
        (Some(path), true) => println!("rebuilt read models kept in {}", path.display()),
        (Some(path), false) => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        (None, _) => println!("rebuilt read models are in {target_url}"),
    }
    if let Some(fault) = report.fault {
        anyhow::bail!("replay FAILED at {fault}");
    }
    anyhow::ensure!(differences == 0, "replay FAILED: {differences} table(s) differ from the live read models");
    println!("replay OK: chain verified, every read model identical");
    Ok(())
}

/// Migrates the replay target and checks that it holds no read models yet.
async fn open_replay_target(url: &str) -> anyhow::Result<ReadDb> {
    let db = match Backend::of_url(url) {
        Some(Backend::Sqlite) => {
            // A scratch database: speed over durability.
            let options = crate::eventstore::sqlite::connect_options(url)?
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Memory)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Off)
                .locking_mode(sqlx::sqlite::SqliteLockingMode::Exclusive)
                // Read models hold no ciphertext, and the file is scratch.
                .pragma("secure_delete", "OFF");
            let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
            crate::migrate::SQLITE.run(&pool).await.context("creating the replay database")?;
            ReadDb::Sqlite(pool)
        }
        Some(Backend::Postgres) => {
            let pool = sqlx::PgPool::connect(url).await.context("connecting to the replay database")?;
            crate::migrate::POSTGRES.run(&pool).await.context("creating the replay database")?;
            ReadDb::Postgres(pool)
        }
        None => anyhow::bail!("--into must start with sqlite: or postgres://"),
    };
    let sql = "SELECT count(*) FROM checkpoints WHERE name LIKE 'projection:%' AND position > 0";
    let used: i64 = privcomm_projections::on_db!(&db, pool => sqlx::query_scalar(sql).fetch_one(pool).await?);
    anyhow::ensure!(used == 0, "{url} already holds read models; replay needs an empty database");
    Ok(db)
}

/// A progress line on standard error: redrawn in place on a terminal,
/// every 10 % otherwise.
struct Progress {
    total: Option<u64>,
    started: Instant,
    shown: Instant,
    terminal: bool,
    last_tenth: u64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            total: None,
            started: Instant::now(),
            shown: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    fn show(&mut self, done: u64, at: Position) {
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let line = match self.total.filter(|t| *t > 0) {
            Some(total) => {
                let fraction = (at.0 as f64 / total as f64).min(1.0);
                let filled = (fraction * 30.0) as usize;
                format!(
                    "[{}{}] {:>3.0}% {done} events, position {at}/{total}, {rate:.0}/s",
                    "#".repeat(filled),
                    " ".repeat(30 - filled),
                    fraction * 100.0
                )
            }
            None => format!("{done} events, position {at}, {rate:.0}/s"),
        };
        if self.terminal {
            if self.shown.elapsed().as_millis() >= 100 {
                eprint!("\r{line}");
                self.shown = Instant::now();
            }
        } else {
            let tenth = self.total.filter(|t| *t > 0).map_or(done / 100_000, |t| at.0 * 10 / t);
            if tenth > self.last_tenth {
                eprintln!("replay: {line}");
                self.last_tenth = tenth;
            }
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// `privcomm retention …`.
#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Run every retention job once, now: expiry, prekey compaction, ciphertext.
    RunNow {
        #[command(flatten)]
        log: LogArgs,
        /// Ciphertext grace period after delivery.
        #[arg(long, env = "CIPHERTEXT_GRACE", default_value = "1h", value_parser = crate::config::parse_duration)]
        ciphertext_grace: std::time::Duration,
    },
}

/// Runs a retention command.
pub async fn retention(command: RetentionCommand) -> anyhow::Result<()> {
    let RetentionCommand::RunNow { log, ciphertext_grace } = command;
    let store = open_log(&log.database_url).await?;
    let read = crate::projector::open_read_db(&log.database_url).await?;
    let policy = privcomm_projections::retention::RetentionPolicy { ciphertext_grace, ..Default::default() };
    let retention =
        privcomm_projections::retention::Retention::new(store, read, Arc::new(crate::clock::SystemClock), policy);
    let report = retention.run_all().await?;
    println!(
        "retention: {} messages expired, {} users' prekeys compacted, {} payloads dropped",
        report.messages_expired, report.prekey_users_compacted, report.payloads_dropped
    );
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for microseconds since the epoch.
pub fn utc(micros: i64) -> String {
    let seconds = micros.div_euclid(1_000_000);
    let millis = micros.rem_euclid(1_000_000) / 1_000;
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// `privcomm checkpoint-key`: a new Ed25519 seed for `CHECKPOINT_SIGNING_KEY`.
pub fn checkpoint_key() -> anyhow::Result<()> {
    let seed: [u8; 32] = rand::random();
    let seed = hex::encode(seed);
    let signer = privcomm_projections::checkpoints::CheckpointSigner::from_hex_seed(&seed)?;
    println!("CHECKPOINT_SIGNING_KEY={seed}");
    println!("public key (give it to auditors to pin): {}", signer.public_key_hex());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(951_782_400_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(super::utc(1_795_903_200_123_456), "2026-11-28T22:00:00.123Z");
    }
}
