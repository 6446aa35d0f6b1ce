//! The projector role in `privcomm serve`: the projection workers of
//! `privcomm-projections`, on the event store's own database, fed by the
//! in-process bus (embedded) or durable JetStream consumers (cluster).

use crate::eventstore::Backend;
use crate::eventstore::postgres::PoolSize;
use anyhow::Context as _;
use privcomm_api::metrics::MetricsSource;
use privcomm_domain::{Clock, EventStore};
use privcomm_projections::checkpoints::{CheckpointSigner, run_checkpointer};
use privcomm_projections::models;
use privcomm_projections::retention::{Retention, RetentionPolicy, RetentionSchedule, run_on_schedule};
use privcomm_projections::store::{ReadDb, ReadStore, SqlReadStore};
use privcomm_projections::worker::{Feed, Projector, stopped};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Opens a connection pool for read models on the database at `url`
/// (migrated already), for a process that does not hold the event store
/// itself (`privcomm replay`, `retention run-now`). SQLite: one connection,
/// which waits for the serving process's writer when both write.
/// `privcomm serve` uses [`crate::serve::OpenedStore::read_db`] instead.
pub async fn open_read_db(url: &str) -> anyhow::Result<ReadDb> {
    match Backend::of_url(url) {
        Some(Backend::Postgres) => {
            // A few connections: a writer, a snapshot, retention reading beside them.
            let size = PoolSize { min: 1, max: models::all().len() as u32 + 1 };
            let pool = crate::eventstore::postgres::connect_pool(url, size)
                .await
                .context("connecting the read-model pool to PostgreSQL")?;
            Ok(ReadDb::Postgres(pool))
        }
        Some(Backend::Sqlite) => {
            let options = crate::eventstore::sqlite::connect_options(url)?;
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .context("opening the read-model connection to SQLite")?;
            Ok(ReadDb::Sqlite(pool))
        }
        None => anyhow::bail!("DATABASE_URL must start with postgres://, postgresql:// or sqlite:"),
    }
}

/// The running projector's figures for `/metrics` (empty while another node runs it).
#[derive(Default)]
pub struct ProjectionMetrics {
    running: Mutex<Option<Arc<Projector>>>,
}

impl MetricsSource for ProjectionMetrics {
    fn render(&self, out: &mut String) {
        if let Some(projector) = self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            projector.render_metrics(out);
        }
    }
}

/// Everything the workers need.
#[derive(Clone)]
pub struct ProjectorSetup {
    /// Where the read models live.
    pub read_store: Arc<dyn ReadStore>,
    /// Where events come from.
    pub feed: Arc<dyn Feed>,
    /// The log (for lag figures).
    pub log: Arc<dyn EventStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Where the figures go.
    pub metrics: Arc<ProjectionMetrics>,
    /// The retention jobs and when they run (they choose from the read models).
    pub retention: Option<(Arc<Retention>, RetentionSchedule)>,
    /// Signing checkpoints: where they are stored, the key, every N events, every T.
    pub checkpoints: Option<(ReadDb, Arc<CheckpointSigner>, u64, std::time::Duration)>,
}

impl ProjectorSetup {
    /// Read models in `db`.
    pub fn new(db: ReadDb, feed: Arc<dyn Feed>, log: Arc<dyn EventStore>, clock: Arc<dyn Clock>) -> ProjectorSetup {
        ProjectorSetup {
            read_store: Arc::new(SqlReadStore::new(db)),
            feed,
            log,
            clock,
            metrics: Arc::new(ProjectionMetrics::default()),
            retention: None,
            checkpoints: None,
        }
    }

    /// Also signs checkpoints of the log, stored in `db`.
    pub fn with_checkpoints(
        mut self,
        db: ReadDb,
        signer: CheckpointSigner,
        every_events: u64,
        interval: std::time::Duration,
    ) -> ProjectorSetup {
        self.checkpoints = Some((db, Arc::new(signer), every_events, interval));
        self
    }

    /// Also runs the retention jobs on `schedule`, choosing from the read models in `db`.
    pub fn with_retention(
        mut self,
        db: ReadDb,
        policy: RetentionPolicy,
        schedule: RetentionSchedule,
    ) -> ProjectorSetup {
        let retention = Retention::new(self.log.clone(), db, self.clock.clone(), policy);
        self.retention = Some((Arc::new(retention), schedule));
        self
    }

    /// Runs every model's worker until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        // One worker, one feed and one transaction per batch for every model,
        // in both modes: SQLite has one writer anyway, and on PostgreSQL a
        // worker per model cost five consumers' deliveries and five commits
        // per batch, which the relay load run paid for (ADR 0010).
        let groups = vec![models::all()];
        let (projector, mut handles) = Projector::spawn(
            groups,
            self.read_store.clone(),
            self.feed.clone(),
            self.log.clone(),
            self.clock.clone(),
            stop.clone(),
        );
        *self.metrics.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(projector));
        if let Some((retention, schedule)) = &self.retention {
            handles.push(tokio::spawn(run_on_schedule(retention.clone(), *schedule, stop.clone())));
        }
        if let Some((db, signer, every_events, interval)) = &self.checkpoints {
            handles.push(tokio::spawn(run_checkpointer(
                self.log.clone(),
                db.clone(),
                signer.clone(),
                self.clock.clone(),
                *every_events,
                *interval,
                stop.clone(),
            )));
        }
        // If this future is dropped (leadership lost), the guard stops the workers.
        let _running =
            Running { metrics: self.metrics.clone(), workers: handles.iter().map(|h| h.abort_handle()).collect() };
        stopped(&mut stop).await;
        for handle in handles {
            let _ = handle.await;
        }
    }
}

/// Stops the workers and withdraws their figures when the projector stops.
struct Running {
    metrics: Arc<ProjectionMetrics>,
    workers: Vec<tokio::task::AbortHandle>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
        *self.metrics.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
