//! The `privcomm` command: a thin shell over the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use privcomm::config::{LogFormat, ServeConfig};

#[derive(Parser)]
#[command(name = "privcomm", version, about = "Self-hostable end-to-end-encrypted messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (every role in one process).
    Serve(Box<ServeConfig>),
    /// Database migrations: apply (default), roll back, show, print.
    Migrate {
        /// `sqlite:PATH` or `postgres://…`.
        #[arg(long, env = "DATABASE_URL", default_value = privcomm::config::DEFAULT_DATABASE_URL, global = true)]
        database_url: String,
        #[command(subcommand)]
        action: Option<MigrateAction>,
    },
    /// Benchmark the event store and print figures (see docs/BENCHMARKS.md).
    BenchStore(privcomm::bench::BenchArgs),
    /// Benchmark bundle fetches and registrations through the API (see docs/BENCHMARKS.md).
    BenchApi(privcomm::bench_api::BenchApiArgs),
    /// Replay benchmark: fill a log, time `privcomm replay` over it (see docs/BENCHMARKS.md).
    BenchReplay(privcomm::bench_replay::BenchReplayArgs),
    /// Relay load run: nodes, clients, open-loop messages (see docs/BENCHMARKS.md).
    Loadgen(privcomm::loadgen::LoadgenArgs),
    /// Rebuild every read model from the log, verify the chain, compare with the live models.
    Replay(privcomm::audit::ReplayArgs),
    /// Write the event log as NDJSON for auditors.
    Export(privcomm::audit::ExportArgs),
    /// Auditors' checks: identity history, offline verification of an export.
    #[command(subcommand)]
    Audit(privcomm::audit::AuditCommand),
    /// Retention jobs (expiry, compaction).
    #[command(subcommand)]
    Retention(privcomm::audit::RetentionCommand),
    /// Print a new checkpoint signing key (CHECKPOINT_SIGNING_KEY) and its public key.
    CheckpointKey,
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply every pending migration (the default).
    Up,
    /// Roll back the last N applied migrations, newest first.
    Down {
        /// How many.
        #[arg(default_value_t = 1)]
        count: usize,
        /// Allow rolling back the event log itself while it holds events.
        #[arg(long)]
        allow_data_loss: bool,
    },
    /// Every migration: applied (with when) or pending, with checksums.
    Status,
    /// Print the SQL that `up` (or `down N`) would run; execute nothing.
    Sql {
        /// `up` (every pending migration) or `down`.
        #[arg(value_enum, default_value = "up")]
        direction: privcomm::migrate::Direction,
        /// With `down`: how many.
        #[arg(default_value_t = 1)]
        count: usize,
    },
}

async fn migrate(database_url: &str, action: MigrateAction) -> anyhow::Result<()> {
    use privcomm::migrate;
    match action {
        MigrateAction::Up => {
            let applied = migrate::up(database_url).await?;
            match applied.as_slice() {
                [] => println!("nothing to apply; the database is up to date"),
                _ => println!("applied {} migration(s) {applied:?}; the database is up to date", applied.len()),
            }
        }
        MigrateAction::Down { count, allow_data_loss } => {
            let reverted = migrate::down(database_url, count, allow_data_loss).await?;
            match reverted.as_slice() {
                [] => println!("nothing to roll back; no migration is applied"),
                _ => println!("rolled back {} migration(s) {reverted:?}", reverted.len()),
            }
        }
        MigrateAction::Status => {
            let rows = migrate::status(database_url).await?;
            print!("{}", migrate::status_table(&rows));
            if let Some(refusal) = migrate::refusal(&rows) {
                anyhow::bail!(refusal);
            }
        }
        MigrateAction::Sql { direction, count } => print!("{}", migrate::sql(database_url, direction, count).await?),
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    init_logging_with(format, "info,sqlx=warn,async_nats=warn");
}

fn init_logging_with(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = terminate => {} }
    tracing::info!("shutdown requested");
}

/// mimalloc: under relay load glibc malloc took ~15 % of a node's CPU
/// (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Before any SQLite connection opens.
    if !privcomm::sqlite_memory::install() {
        eprintln!("warning: SQLite kept its own allocator (it was initialised before privcomm could configure it)");
    }
    let result = match cli.command {
        Command::Serve(config) => {
            init_logging(config.log_format);
            serve(*config).await
        }
        Command::Migrate { database_url, action } => {
            init_logging_with(LogFormat::Text, "warn");
            migrate(&database_url, action.unwrap_or(MigrateAction::Up)).await
        }
        Command::BenchStore(args) => {
            init_logging(LogFormat::Text);
            privcomm::bench::run(args).await
        }
        Command::BenchApi(args) => {
            // Request logs would drown the figures and cost CPU the benchmark measures.
            init_logging_with(LogFormat::Text, "warn");
            privcomm::bench_api::run(args).await
        }
        Command::BenchReplay(args) => {
            init_logging_with(LogFormat::Text, "warn");
            privcomm::bench_replay::run(args).await
        }
        Command::Loadgen(args) => {
            init_logging_with(LogFormat::Text, "warn");
            privcomm::loadgen::run(args).await
        }
        Command::Replay(args) => {
            init_logging_with(LogFormat::Text, "warn");
            privcomm::audit::replay(args).await
        }
        Command::Export(args) => {
            init_logging_with(LogFormat::Text, "warn");
            privcomm::audit::export(args).await
        }
        Command::Audit(command) => {
            init_logging_with(LogFormat::Text, "warn");
            privcomm::audit::audit(command).await
        }
        Command::Retention(command) => {
            init_logging(LogFormat::Text);
            privcomm::audit::retention(command).await
        }
        Command::CheckpointKey => privcomm::audit::checkpoint_key(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            tracing::error!(error = format!("{error:#}"), "privcomm failed");
            std::process::ExitCode::from(2)
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {} (LISTEN_ADDR)", config.listen))?;
    privcomm::serve::run(config, listener, shutdown_signal()).await
}
