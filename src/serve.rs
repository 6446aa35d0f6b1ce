//! `privcomm serve`: opens the store and the bus, starts the outbox
//! publisher, and serves the HTTP API until shutdown.

use crate::bus::inprocess::{InProcessBus, InProcessPush};
use crate::bus::nats::{NatsBus, NatsBusConfig, NatsPresence, NatsPush};
use crate::clock::SystemClock;
use crate::config::{Role, ServeConfig};
use crate::eventstore::postgres::{PoolSize, PostgresEventStore};
use crate::eventstore::sqlite::SqliteEventStore;
use crate::eventstore::{Backend, LogStore};
use crate::migrate;
use crate::outbox::OutboxPublisher;
use anyhow::Context as _;
use privcomm_api::AppState;
use privcomm_api::users::Directory;
use privcomm_domain::{EventBus, StoreError};
use privcomm_relay::hub::Hub;
use privcomm_relay::presence::{Presence, Roster};
use privcomm_relay::push::{PushSink, Pusher};
use privcomm_relay::{RelaySettings, RelayState};
use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An opened event store, and for SQLite the lock that keeps other
/// processes off its file for as long as this value lives.
pub struct OpenedStore {
    /// The store.
    pub store: Arc<dyn LogStore>,
    /// Where embedded mode's read models live: the same file, through the
    /// store's writer connection. `None` on PostgreSQL, where the projector
    /// opens a pool of its own on a runtime of its own.
    pub read_db: Option<privcomm_projections::store::ReadDb>,
    _file_lock: Option<File>,
}

/// Opens (and in embedded mode creates and migrates) the event store.
pub async fn open_store(config: &ServeConfig) -> anyhow::Result<OpenedStore> {
    let backend = config.validate()?;
    let clock = Arc::new(SystemClock);
    match backend {
        Backend::Sqlite => {
            let path = sqlite_path(&config.database_url);
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            let file_lock = lock_exclusively(&path)?;
            migrate::migrate_up(&config.database_url).await?;
            let (readers, writer) = crate::eventstore::sqlite::connect_pools(&config.database_url)
                .await
                .with_context(|| format!("opening SQLite database {}", config.database_url))?;
            let store = SqliteEventStore::open(readers, writer, clock).await?;
            let read_db = privcomm_projections::store::ReadDb::Sqlite(store.writer().clone());
            Ok(OpenedStore { store: Arc::new(store), read_db: Some(read_db), _file_lock: Some(file_lock) })
        }
        Backend::Postgres => {
            let size = PoolSize { min: config.db_pool_min_size, max: config.db_pool_max_size };
            let pool = crate::eventstore::postgres::connect_pool(&config.database_url, size)
                .await
                .context("connecting to PostgreSQL (DATABASE_URL)")?;
            // Refuses an edited, unknown or failed migration either way.
            let pending = migrate::pending_postgres(&pool).await?;
            if config.migrate && pending > 0 {
                migrate::POSTGRES.run(&pool).await.context("applying PostgreSQL migrations")?;
            } else {
                anyhow::ensure!(
                    pending == 0,
                    "the PostgreSQL database has {pending} pending migration(s): run `privcomm migrate` first, or start with --migrate (AUTO_MIGRATE=true)"
                );
            }
            let store = Arc::new(PostgresEventStore::open(pool, clock).await?);
            Ok(OpenedStore { store, read_db: None, _file_lock: None })
        }
    }
}

/// `sqlite:data/privcomm.db` or `sqlite://data/privcomm.db?mode=rwc` → `data/privcomm.db`.
pub(crate) fn sqlite_path(url: &str) -> PathBuf {
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    PathBuf::from(path.split('?').next().unwrap_or(path))
}

/// Embedded mode announces new events in-process, so a second process on the
/// same file would never be woken by the first one's appends. Refuse it.
fn lock_exclusively(database: &Path) -> anyhow::Result<File> {
    let lock_path = database.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another privcomm process is already serving {} (lock {}); embedded mode allows one process per database file — use PostgreSQL + NATS to run several",
            database.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", lock_path.display()))
        }
    }
}

/// How a node talks to the others: the event bus, presence signals (cluster
/// mode only) and where push requests go.
#[derive(Clone)]
pub struct Links {
    /// Committed events, in log order.
    pub bus: Arc<dyn EventBus>,
    /// Who is connected where, across nodes.
    pub presence: Option<Arc<dyn Presence>>,
    /// "You have mail" requests for a push gateway.
    pub push: Arc<dyn PushSink>,
    /// The projection workers' feed (durable consumers on NATS).
    pub feed: Arc<dyn privcomm_projections::worker::Feed>,
}

impl Links {
    /// Embedded mode: the in-process bus over `store`, serving what the
    /// outbox published before (a restart), no presence, the given push feed.
    pub async fn embedded(store: Arc<dyn LogStore>, push: Arc<InProcessPush>) -> Result<Links, StoreError> {
        let published = store.load_checkpoint(crate::outbox::CHECKPOINT).await?;
        let bus: Arc<dyn EventBus> = Arc::new(InProcessBus::published_up_to(store, published));
        let feed = Arc::new(privcomm_projections::worker::BusFeed(bus.clone()));
        Ok(Links { bus, presence: None, push, feed })
    }

    /// Cluster mode: JetStream, presence and push subjects on one NATS connection.
    pub fn nats(bus: Arc<NatsBus>) -> Links {
        let presence: Arc<dyn Presence> = Arc::new(NatsPresence::new(&bus));
        let push: Arc<dyn PushSink> = Arc::new(NatsPush::new(&bus));
        let feed = Arc::new(crate::bus::nats::NatsFeed::new(bus.clone()));
        Links { bus, presence: Some(presence), push, feed }
    }
}

/// Opens the links: NATS when `NATS_URL` is set, else in-process.
pub async fn open_links(config: &ServeConfig, store: Arc<dyn LogStore>) -> anyhow::Result<Links> {
    match &config.nats_url {
        Some(url) => {
            let bus_config = NatsBusConfig::for_stream(&config.nats_stream);
            let bus = NatsBus::connect(url, bus_config).await.context("connecting to NATS JetStream (NATS_URL)")?;
            Ok(Links::nats(Arc::new(bus)))
        }
        None => Links::embedded(store, Arc::new(InProcessPush::default()))
            .await
            .context("reading the outbox checkpoint for the in-process bus"),
    }
}

/// Resolves once `flag` is true (never, if its sender is gone).
pub async fn wait_until_true(flag: &mut watch::Receiver<bool>) {
    privcomm_relay::presence::stopped(flag).await;
}

/// The router of a process's roles, over one store: `/health/` and
/// `/metrics` always, the HTTP API with [`Role::Api`], the WebSocket relay
/// with [`Role::Relay`]. `stop_connections` turning true closes relay
/// connections with 1001.
///
/// With the relay, starts its background tasks: doorbells from the bus and,
/// with presence, cluster-wide takeover and the roster of who is online
/// where. They stop with `stop_connections`.
#[allow(clippy::too_many_arguments)]
pub fn build_app(
    store: Arc<dyn LogStore>,
    links: Links,
    clock: Arc<dyn privcomm_domain::Clock>,
    api_config: &privcomm_api::ApiConfig,
    relay_settings: RelaySettings,
    stop_connections: watch::Receiver<bool>,
    metric_sources: &[Arc<dyn privcomm_api::metrics::MetricsSource>],
    roles: &[Role],
) -> axum::Router {
    let Links { bus, presence, push, feed: _ } = links;
    let state = AppState::new(store.clone(), bus.clone(), store.clone(), clock.clone(), api_config);
    for source in metric_sources {
        state.metrics.add_source(source.clone());
    }
    let http = if roles.contains(&Role::Api) {
        privcomm_api::router(state.clone(), api_config)
    } else {
        privcomm_api::operations_router(state.clone(), api_config)
    };
    if !roles.contains(&Role::Relay) {
        return http;
    }
    let hub = Arc::new(Hub::default());
    state.metrics.add_source(Arc::new(RelayConnections(hub.clone())));
    let roster = Arc::new(Roster::new(uuid::Uuid::now_v7(), relay_settings.presence.lease));
    tokio::spawn(privcomm_relay::presence::ring_doorbells(bus, hub.clone(), stop_connections.clone()));
    if let Some(presence) = &presence {
        tokio::spawn(privcomm_relay::presence::follow_presence(
            presence.clone(),
            hub.clone(),
            roster.clone(),
            relay_settings.presence,
            stop_connections.clone(),
        ));
    }
    let relay = RelayState {
        users: state.users.clone(),
        mailboxes: Arc::new(Directory::new(store, api_config.user_cache_capacity, state.metrics.clone())),
        tokens: state.tokens.clone(),
        clock,
        hub,
        settings: relay_settings,
        shutdown: stop_connections,
        presence,
        roster,
        pusher: Arc::new(Pusher::new(push, relay_settings.push_coalesce)),
    };
    http.merge(privcomm_relay::router(relay))
}

/// `privcomm_relay_connections` on `/metrics`.
struct RelayConnections(Arc<Hub>);

impl privcomm_api::metrics::MetricsSource for RelayConnections {
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ =
            writeln!(out, "# HELP privcomm_relay_connections WebSocket connections on this process (one per user).");
        let _ = writeln!(out, "# TYPE privcomm_relay_connections gauge");
        let _ = writeln!(out, "privcomm_relay_connections {}", self.0.len());
    }
}

/// The advisory lock of the projection workers (the outbox's, plus one).
pub const PROJECTOR_LOCK: i64 = crate::outbox::LEADER_LOCK + 1;

/// Runs every role on an already-bound listener until `shutdown` resolves.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Each WebSocket is a file descriptor: use all the hard limit allows.
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(limit, "open-file limit");
    }
    let opened = open_store(&config).await?;
    let store = opened.store.clone();
    let links = open_links(&config, store.clone()).await?;
    let bus = links.bus.clone();
    let (stop, stopped) = watch::channel(false);
    let stop_signal = stopped.clone();
    let wait_stop = move || {
        let mut stopped = stop_signal.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let outbox = match Backend::of_url(&config.database_url) {
        // Several nodes share the database: one publishes at a time.
        Some(Backend::Postgres) => tokio::spawn(crate::outbox::publish_while_leader(
            config.database_url.clone(),
            store.clone(),
            bus.clone(),
            wait_stop(),
        )),
        _ => tokio::spawn(OutboxPublisher::new(store.clone(), bus.clone()).run(wait_stop())),
    };

    let policy = privcomm_projections::retention::RetentionPolicy {
        ciphertext_grace: config.ciphertext_grace,
        ..Default::default()
    };
    let schedule = privcomm_projections::retention::RetentionSchedule::new(
        config.retention_expire_at,
        config.retention_compact_at,
        config.ciphertext_grace,
    );
    let projection_metrics = Arc::new(crate::projector::ProjectionMetrics::default());
    let projector = {
        let (feed, store, metrics) = (links.feed.clone(), store.clone(), projection_metrics.clone());
        let signer = config.checkpoint_signer();
        if signer.is_none() {
            tracing::info!("CHECKPOINT_SIGNING_KEY is not set: the log's head is not signed");
        }
        let (every_events, interval) = (config.checkpoint_every_events, config.checkpoint_interval);
        move |read_db: privcomm_projections::store::ReadDb| {
            let mut projector =
                crate::projector::ProjectorSetup::new(read_db.clone(), feed, store, Arc::new(SystemClock))
                    .with_retention(read_db.clone(), policy, schedule);
            if let Some(signer) = signer {
                projector = projector.with_checkpoints(read_db, signer, every_events, interval);
            }
            projector.metrics = metrics;
            projector
        }
    };
    let projection = match &opened.read_db {
        _ if !config.runs(Role::Projector) => tokio::spawn(async {}),
        Some(read_db) => tokio::spawn(projector(read_db.clone()).run(stopped.clone())),
        // Cluster mode: one projector per cluster, like the outbox, on a
        // thread and runtime of its own. On the node's runtime each of a
        // batch's database round trips waited behind the relay's tasks, and
        // under load the workers fell seconds behind (docs/BENCHMARKS.md).
        None => {
            let (url, stop, shutdown) = (config.database_url.clone(), stopped.clone(), wait_stop());
            tokio::task::spawn_blocking(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => return tracing::error!(%error, "cannot start the projector's runtime"),
                };
                runtime.block_on(async move {
                    tokio::pin!(shutdown);
                    // Opened here, so its connections belong to this runtime.
                    let read_db = loop {
                        match crate::projector::open_read_db(&url).await {
                            Ok(read_db) => break read_db,
                            Err(error) => {
                                tracing::warn!(
                                    error = format!("{error:#}"),
                                    "cannot open the read-model pool; retrying in 2 s"
                                );
                                tokio::select! {
                                    () = &mut shutdown => return,
                                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                                }
                            }
                        }
                    };
                    let projector = projector(read_db);
                    let work = move || Box::pin(projector.clone().run(stop.clone())) as crate::leader::LeaderWork;
                    crate::leader::while_leader(url, PROJECTOR_LOCK, "the projection workers", work, shutdown).await;
                });
            })
        }
    };

    let api_config = config.api_config();
    // Lag figures only where the workers can run.
    let metric_sources: Vec<Arc<dyn privcomm_api::metrics::MetricsSource>> =
        if config.runs(Role::Projector) { vec![projection_metrics] } else { Vec::new() };
    let (stop_connections, connections_stop) = watch::channel(false);
    let app = build_app(
        store.clone(),
        links,
        Arc::new(SystemClock),
        &api_config,
        RelaySettings::default(),
        connections_stop,
        &metric_sources,
        &config.roles,
    );
    let address = listener.local_addr().context("reading the listen address")?;
    let roles: Vec<&str> = config.roles.iter().map(|r| r.name()).collect();
    tracing::info!(
        %address,
        node = %api_config.node.node,
        roles = %roles.join(","),
        backend = ?Backend::of_url(&config.database_url),
        bus = if config.nats_url.is_some() { "nats" } else { "in-process" },
        "privcomm serving"
    );
    if !config.runs(Role::Projector) && opened.read_db.is_some() {
        tracing::warn!("embedded mode without the projector role: read models, retention and checkpoints do not run");
    }
    if api_config.previous_secret_key.is_some() {
        tracing::info!(
            accepted_for_s = api_config.tokens.token_lifetime_s,
            "SECRET_KEY_PREVIOUS is set: tokens and challenges signed with it are accepted for one token lifetime"
        );
    }
    // No Nagle: a relay writes small frames back to back (`sent`, then
    // `message`s), and a frame held back until the client acknowledges the
    // previous one waits out the client's delayed ACK (40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown.await;
            // WebSocket connections close with 1001; axum then waits for them.
            let _ = stop_connections.send(true);
            let _ = stop.send(true);
        })
        .await
        .context("serving HTTP")?;
    let _ = outbox.await;
    let _ = projection.await;
    drop(opened);
    tracing::info!("privcomm stopped");
    Ok(())
}
