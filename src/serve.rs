//! `privcomm serve`: opens the store and the bus, starts the outbox
//! publisher, and serves the HTTP API until shutdown.

use crate::bus::inprocess::InProcessBus;
use crate::bus::nats::{NatsBus, NatsBusConfig};
use crate::clock::SystemClock;
use crate::config::ServeConfig;
use crate::eventstore::postgres::{PoolSize, PostgresEventStore};
use crate::eventstore::sqlite::SqliteEventStore;
use crate::eventstore::{Backend, LogStore};
use crate::migrate;
use crate::outbox::OutboxPublisher;
use anyhow::Context as _;
use privcomm_api::AppState;
use privcomm_domain::EventBus;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Opens (and in embedded mode creates and migrates) the event store.
pub async fn open_store(config: &ServeConfig) -> anyhow::Result<Arc<dyn LogStore>> {
    let backend = config.validate()?;
    let clock = Arc::new(SystemClock);
    match backend {
        Backend::Sqlite => {
            create_parent_dir(&config.database_url)?;
            migrate::migrate_up(&config.database_url).await?;
            let (readers, writer) = crate::eventstore::sqlite::connect_pools(&config.database_url)
                .await
                .with_context(|| format!("opening SQLite database {}", config.database_url))?;
            Ok(Arc::new(SqliteEventStore::open(readers, writer, clock).await?))
        }
        Backend::Postgres => {
            let size = PoolSize { min: config.db_pool_min_size, max: config.db_pool_max_size };
            let pool = crate::eventstore::postgres::connect_pool(&config.database_url, size)
                .await
                .context("connecting to PostgreSQL (DATABASE_URL)")?;
            if config.migrate {
                migrate::POSTGRES.run(&pool).await.context("applying PostgreSQL migrations")?;
            } else {
                let pending = migrate::pending_postgres(&pool).await.context("reading the migration state")?;
                anyhow::ensure!(
                    pending == 0,
                    "the PostgreSQL database has {pending} pending migration(s): run `privcomm migrate` first, or start with --migrate (AUTO_MIGRATE=true)"
                );
            }
            Ok(Arc::new(PostgresEventStore::open(pool, clock).await?))
        }
    }
}

/// `sqlite:data/privcomm.db` → creates `data/` so a first run just works.
fn create_parent_dir(url: &str) -> anyhow::Result<()> {
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    if let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// Opens the bus: JetStream when `NATS_URL` is set, else in-process.
pub async fn open_bus(config: &ServeConfig, store: Arc<dyn LogStore>) -> anyhow::Result<Arc<dyn EventBus>> {
    match &config.nats_url {
        Some(url) => {
            let bus_config = NatsBusConfig { stream_name: config.nats_stream.clone(), ..NatsBusConfig::default() };
            let bus = NatsBus::connect(url, bus_config).await.context("connecting to NATS JetStream (NATS_URL)")?;
            Ok(Arc::new(bus))
        }
        None => Ok(Arc::new(InProcessBus::new(store))),
    }
}

/// Runs every role on an already-bound listener until `shutdown` resolves.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    let bus = open_bus(&config, store.clone()).await?;
    let (stop, stopped) = watch::channel(false);
    let wait_stop = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let outbox = tokio::spawn(OutboxPublisher::new(store.clone(), bus.clone()).run(wait_stop()));

    let app = privcomm_api::router(AppState { store: store.clone(), bus })
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let address = listener.local_addr().context("reading the listen address")?;
    tracing::info!(%address, backend = ?Backend::of_url(&config.database_url), bus = if config.nats_url.is_some() { "nats" } else { "in-process" }, "privcomm serving");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await
        .context("serving HTTP")?;
    let _ = outbox.await;
    tracing::info!("privcomm stopped");
    Ok(())
}
